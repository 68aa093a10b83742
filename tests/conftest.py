"""Test-suite settings: one torch thread per test process (the suite runs under pytest-xdist on 2 cores), and each
test in a directory of its own."""

from pathlib import Path

import pytest
import torch as th

th.set_num_threads(1)


@pytest.fixture(autouse=True)
def working_directory_outside_the_checkout(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Whatever a test writes to its working directory (MuJoCo's MUJOCO_LOG.TXT, SB3's and rl-zoo3's logs, saved
    models) lands in a temporary directory, not in the checkout; not in ``tmp_path``, whose contents some tests list."""
    directory = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(directory)
    return directory
