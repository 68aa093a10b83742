"""The code examples of the documentation and the README run, and their figures are BENCHMARKS.md's.

Each page's Python blocks run in order in one namespace (a later block may use what an
earlier one defined), in a temporary folder, with every ``learn()`` cut to one rollout: a
renamed argument or a moved import breaks this test, not a reader's first try.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
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


# --------------------------------------------------------------------- the README's promises
README = REPO / "README.md"
QUICKSTART_PAGE = DOCS / "guide" / "quickstart.rst"
# The last line examples/quickstart.py prints; README.md and the quick-start page quote it.
QUICKSTART_RESULT = re.compile(r"evaluated return over 10 episodes: (-?\d+\.\d \+/- \d+\.\d)")
TORCH_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def headline_cells() -> list[str]:
    """The figure cells of the README's headline tables: every column but the first (what is measured)."""
    lines = readme_section("Headline figures").splitlines()
    separator = {index for index, line in enumerate(lines) if line.startswith("|") and set(line) <= set("|-: ")}
    # Rows of a table, not its header (the row above a separator) nor the separator.
    rows = [line for index, line in enumerate(lines) if line.startswith("|") and not {index, index + 1} & separator]
    cells = [cell.strip() for row in rows for cell in row.strip("|").split("|")[1:]]
    return [cell for cell in cells if re.search(r"\d", cell)]


def test_readme_headline_figures_are_those_of_benchmarks_md() -> None:
    benchmarks = (REPO / "BENCHMARKS.md").read_text()
    cells = headline_cells()
    assert len(cells) >= 10
    missing = [cell for cell in cells if not re.search(rf"(?<![\d.]){re.escape(cell)}(?!\d)", benchmarks)]
    assert not missing, f"README headline figures not in BENCHMARKS.md: {missing}"


def test_readme_quotes_measured_figures_only_in_its_headline_section() -> None:
    from tests.test_zoo import MEASURED_FIGURE

    rest = README.read_text().replace(readme_section("Headline figures"), "")
    rest = QUICKSTART_RESULT.sub("", rest)  # checked against a run by test_quickstart_prints_what_the_docs_state
    lines = [line for line in rest.splitlines() if MEASURED_FIGURE.search(line) or re.search(r"\d\.\d+e-\d", line)]
    assert lines == []
    # Nor durations: they hold on an idle machine only.
    assert not re.search(r"\b(?:a|an|\d+) (?:seconds?|minutes?|hours?)\b", rest)


def stated_quickstart_results() -> dict[str, list[str]]:
    return {page.name: QUICKSTART_RESULT.findall(page.read_text()) for page in (README, QUICKSTART_PAGE)}


def test_readme_and_quick_start_page_state_one_quickstart_result() -> None:
    stated = stated_quickstart_results()
    assert all(len(results) == 1 for results in stated.values()), stated
    assert len({results[0] for results in stated.values()}) == 1, stated
    # The page quotes no evaluation of other runs as the result "with these settings".
    assert "with these settings" not in QUICKSTART_PAGE.read_text()


@pytest.mark.slow
def test_quickstart_prints_what_the_docs_state(tmp_path: Path) -> None:
    """``python examples/quickstart.py``, as the README gives it, ends with the line README.md states."""
    run = subprocess.run(
        [sys.executable, str(REPO / "examples" / "quickstart.py")], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    printed = QUICKSTART_RESULT.findall(run.stdout)
    assert len(printed) == 1, run.stdout[-2000:]
    assert stated_quickstart_results() == {README.name: printed, QUICKSTART_PAGE.name: printed}


def test_every_torch_install_line_takes_the_cpu_wheel_index() -> None:
    """A bare ``pip install torch`` resolves to the CUDA build (with its nvidia-* packages) on the public index."""
    files = [README, DOCS / "guide" / "install.rst", REPO / ".ci" / "run", REPO / ".ci" / "release-check"]
    lines = {f"{path.name}: {line.strip()}" for path in files for line in path.read_text().splitlines()}
    torch_lines = {line for line in lines if re.search(r"pip install (-q )?torch==", line)}
    assert len(torch_lines) >= 4
    assert [line for line in torch_lines if TORCH_INDEX not in line] == []


def test_release_check_runs_the_readme_install_block() -> None:
    """The release check installs with the README's own lines, read from README.md, not a copy of them."""
    release_check = (REPO / ".ci" / "release-check").read_text()
    assert "README.md" in release_check and "## Install" in release_check
    install = readme_section("Install")
    assert TORCH_INDEX in install and 'pip install -e ".[dev]"' in install
    # What it is, install, the two commands, then the rest.
    text = README.read_text()
    assert text.index("## Install") < text.index("## Run") < text.index("python examples/quickstart.py") < text.index("## Why")


def test_all_extra_installs_what_every_packaged_config_needs() -> None:
    """``pip install "sb3_trpo[all]"`` (and ``[dev]``) installs the Gymnasium extra of every packaged task."""
    tomllib = pytest.importorskip("tomllib")
    import gymnasium as gym
    import yaml

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def requirements(extra: str) -> set[str]:
        found: set[str] = set()
        for requirement in extras[extra]:
            own = re.fullmatch(r"sb3_trpo\[([\w,]+)\]", requirement)
            found |= set().union(*(requirements(name) for name in own.group(1).split(","))) if own else {requirement}
        return found

    families = set()
    for config in (REPO / "sb3_trpo" / "zoo_configs").glob("*.yml"):
        for env_id in yaml.safe_load(config.read_text()):
            if env_id in gym.registry and str(gym.spec(env_id).entry_point).startswith("gymnasium.envs."):
                families.add(str(gym.spec(env_id).entry_point).split(".")[2])
    needed = families - {"classic_control"}
    assert needed == {"box2d", "mujoco"}
    for extra in ("all", "dev"):
        installed = requirements(extra)
        assert [family for family in needed if not any(r.startswith(f"gymnasium[{family}]") for r in installed)] == []
