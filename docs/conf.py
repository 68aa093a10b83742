"""Sphinx configuration: SB3's theme and extensions (sphinx_rtd_theme, autodoc, viewcode, copybutton).

Build: ``sphinx-build -W -b html docs docs/_build/html`` after ``pip install ".[docs]"``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The checkout's package, not another installed copy, is the one documented.
sys.path.insert(0, str(ROOT))

import sb3_trpo  # noqa: E402

project = "sb3_trpo"
author = "sb3_trpo developers"
copyright = "2026, sb3_trpo developers"
release = sb3_trpo.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

# Docstrings are written in SB3's ``:param name:`` style; the signature keeps the type hints.
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_class_signature = "mixed"
autodoc_default_options = {"show-inheritance": True}

# CHANGELOG.md is included through MyST; its headings are not cross-reference targets.
myst_heading_anchors = 0

copybutton_prompt_text = r"\$ "
copybutton_prompt_is_regexp = True

html_theme = "sphinx_rtd_theme"
html_title = f"sb3_trpo {release}"
html_show_sourcelink = False


# Links of the included top-level Markdown files (BENCHMARKS.md, CHANGELOG.md) to files of the
# repository become download links; the including pages are one folder deep (guide/, misc/).
_RELATIVE_LINK = re.compile(r"(?<!!)\[([^\]]*)\]\((?!https?:|mailto:|#)([^)\s]+)\)")


def _links_to_downloads(app, relative_path: Path, parent_docname: str, content: list[str]) -> None:
    if relative_path.parts[0] == "..":
        content[0] = _RELATIVE_LINK.sub(r"[\1](path:../../\2)", content[0])


_PARAM = re.compile(r"^(\s*):param (\w+):")


def _param_blocks(lines: list[str]) -> tuple[dict[str, list[str]], list[int]]:
    """The ``:param name:`` fields of a docstring (with their continuation lines), and their line numbers."""
    blocks: dict[str, list[str]] = {}
    owned: list[int] = []
    name = None
    indent = 0
    for number, line in enumerate(lines):
        match = _PARAM.match(line)
        if match:
            name, indent = match.group(2), len(match.group(1))
            blocks[name] = [line.strip()]
        elif name is not None and line.strip() and len(line) - len(line.lstrip()) > indent:
            blocks[name].append("    " + line.strip())
        else:
            name = None
            continue
        owned.append(number)
    return blocks, owned


def _inherit_parameters(app, what: str, name: str, obj, options, lines: list[str]) -> None:
    """A subclass that documents only the parameters it changes gets the rest from its bases' docstrings.

    The algorithm pages then list every constructor parameter in signature order, while each
    parameter is written once in the source, in the class that introduces it.
    """
    if what != "class" or not isinstance(obj, type) or not obj.__module__.startswith("sb3_trpo"):
        return
    import inspect

    from sphinx.util.docstrings import prepare_docstring

    try:
        signature = inspect.signature(obj.__init__)
    except (TypeError, ValueError):
        return
    own, owned = _param_blocks(lines)
    merged: dict[str, list[str]] = {}
    for base in reversed(obj.__mro__[1:]):
        if base.__module__.startswith("sb3_trpo") and base.__doc__:
            merged.update(_param_blocks(prepare_docstring(base.__doc__))[0])
    merged.update(own)
    ordered = [merged[p] for p in signature.parameters if p in merged]
    if not ordered or len(ordered) == len(own):
        return
    fields = [line for block in ordered for line in block]
    at = owned[0] if owned else len(lines)
    kept = [line for number, line in enumerate(lines) if number not in set(owned)]
    if not owned and kept and kept[-1].strip():
        kept.append("")
    lines[:] = kept[:at] + fields + kept[at:]


def setup(app):
    app.connect("include-read", _links_to_downloads)
    app.connect("autodoc-process-docstring", _inherit_parameters)
