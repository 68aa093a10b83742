"""The code examples of the documentation and the README run, and their figures are BENCHMARKS.md's.

Each page's Python blocks run in order in one namespace (a later block may use what an
earlier one defined), in a temporary folder, with every ``learn()`` cut to one rollout: a
renamed argument or a moved import breaks this test, not a reader's first try.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any

import pytest
from stable_baselines3.common.base_class import BaseAlgorithm

from tests.helpers import REPO

DOCS = REPO / "docs"
PAGES = [*sorted(DOCS.rglob("*.rst")), REPO / "README.md"]

# ``.. code-block:: python`` and its options, then the indented body (blank lines included).
RST_BLOCK = re.compile(r"^\.\. code-block:: python\n(?:   :.*\n)*\n((?:(?:   .*)?\n)+)", re.MULTILINE)
MARKDOWN_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
# "mean ± std" returns and "1.92x" speed ratios, as BENCHMARKS.md gives them.
FIGURE = re.compile(r"-?\d+\.\d ± \d+\.\d|\b\d\.\d\d(?=x\b)")


def python_blocks(page: Path) -> list[str]:
    text = page.read_text()
    if page.suffix == ".md":
        return MARKDOWN_BLOCK.findall(text)
    return ["\n".join(line[3:] for line in block.splitlines()) for block in RST_BLOCK.findall(text)]


def pages_with_examples() -> list[Path]:
    return [page for page in PAGES if python_blocks(page)]


def test_the_block_finder_sees_every_python_block() -> None:
    """A block the pattern misses would silently go untested."""
    for page in PAGES:
        text = page.read_text()
        expected = text.count("```python") if page.suffix == ".md" else text.count(".. code-block:: python")
        assert len(python_blocks(page)) == expected, page
    assert len(pages_with_examples()) >= 8


@pytest.fixture
def one_rollout_per_learn(monkeypatch: pytest.MonkeyPatch) -> None:
    """``learn(N)`` trains for one rollout (``n_steps * n_envs`` steps) at most."""
    setup_learn = BaseAlgorithm._setup_learn

    def short_setup_learn(self: BaseAlgorithm, total_timesteps: int, *args: Any, **kwargs: Any) -> Any:
        rollout = getattr(self, "n_steps", 1) * self.n_envs
        return setup_learn(self, min(total_timesteps, rollout), *args, **kwargs)

    monkeypatch.setattr(BaseAlgorithm, "_setup_learn", short_setup_learn)


@pytest.mark.parametrize("page", pages_with_examples(), ids=lambda page: str(page.relative_to(REPO)))
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_rollout_per_learn: None) -> None:
    monkeypatch.chdir(tmp_path)  # saved models, logs and MuJoCo's MUJOCO_LOG.TXT land here
    namespace: dict[str, Any] = {"__name__": "__docs_example__"}
    for number, block in enumerate(python_blocks(page)):
        code = compile(block, f"{page.relative_to(REPO)} (python block {number})", "exec")
        exec(code, namespace)


def test_figures_quoted_in_the_docs_are_those_of_benchmarks_md() -> None:
    benchmarks = (REPO / "BENCHMARKS.md").read_text()
    quoted = {figure: page.relative_to(REPO) for page in PAGES for figure in FIGURE.findall(page.read_text())}
    assert quoted
    missing = {figure: str(page) for figure, page in quoted.items() if figure not in benchmarks}
    assert not missing, f"figures not in BENCHMARKS.md: {missing}"


def test_files_and_tests_the_docs_name_exist() -> None:
    """A renamed module, example, test or result file leaves no dead reference behind."""
    texts = {page: page.read_text() for page in PAGES}
    named = {
        path
        for text in texts.values()
        for path in re.findall(r"\b(?:tests|examples|benchmark_results|sb3_trpo)/[\w./-]+\.(?:py|md|yml|png|txt)\b", text)
    }
    assert len(named) >= 10
    assert not [path for path in named if not (REPO / path).exists()]
    test_sources = "\n".join(path.read_text() for path in (REPO / "tests").glob("test_*.py"))
    tests_named = {name for text in texts.values() for name in re.findall(r"``(test_\w+)``", text)}
    assert tests_named
    assert not [name for name in tests_named if f"def {name}(" not in test_sources]


def test_the_tests_readme_maps_every_module_to_test_files_that_exist() -> None:
    text = (REPO / "tests" / "README.md").read_text()
    patterns = re.findall(r"^\| `([^`]+)`", text, re.MULTILINE)
    sources = [*(REPO / "sb3_trpo").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]
    modules = {str(path.relative_to(REPO)) for path in sources if path.name != "__init__.py" or path.parent.name == "sb3_trpo"}
    assert sorted(m for m in modules if not any(fnmatch.fnmatch(m, pattern) for pattern in patterns)) == []
    named = set(re.findall(r"`(test_\w+\.py)`", text))
    assert sorted(name for name in named if not (REPO / "tests" / name).exists()) == []
    assert sorted({path.name for path in (REPO / "tests").glob("test_*.py")} - named) == []
