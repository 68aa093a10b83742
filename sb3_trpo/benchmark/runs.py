"""Run sets of the returns benchmark: the run files of a folder, and those its ``runs.txt`` names.

A run file is one run's JSON record, ``<env>__<impl>__seed<seed>.json``, plain or gzip-compressed
(``.json.gz``). A folder's ``runs.txt`` lists run files kept in other folders, one glob pattern a
line, relative to the folder (``#`` starts a comment): a report includes them without a copy.
"""

from __future__ import annotations

import glob
import gzip
import json
import sys
from pathlib import Path
from typing import Any

MANIFEST = "runs.txt"
RUN_SUFFIXES = (".json", ".json.gz")


def read_run(path: Path) -> Any:
    """The JSON content of a run file, plain or gzip-compressed (``.gz``)."""
    with (gzip.open(path, "rt") if path.suffix == ".gz" else path.open()) as file:
        return json.load(file)


def run_files(results_dir: Path) -> list[Path]:
    """The run files of ``results_dir`` and those its ``runs.txt`` names, sorted by file name.

    :raises ValueError: when a pattern of ``runs.txt`` names no run file, or two files the same run
    """
    if not results_dir.is_dir():
        return []
    paths = [path for path in results_dir.iterdir() if path.name.endswith(RUN_SUFFIXES) and not path.name.startswith(".")]
    manifest = results_dir / MANIFEST
    if manifest.is_file():
        for line in manifest.read_text().splitlines():
            pattern = line.partition("#")[0].strip()
            if not pattern:
                continue
            matches = [Path(match) for match in glob.glob(str(results_dir / pattern)) if match.endswith(RUN_SUFFIXES)]
            if not matches:
                raise ValueError(f"{manifest}: {pattern!r} names no run file")
            paths += matches
    runs: dict[str, Path] = {}
    for path in paths:
        name = path.name.removesuffix(".gz")
        if name in runs and runs[name].resolve() != path.resolve():
            raise ValueError(f"two files of the run {name} in the run set of {results_dir}: {runs[name]} and {path}")
        runs[name] = path
    return [runs[name] for name in sorted(runs)]


def load_results(results_dir: Path) -> list[dict[str, Any]]:
    """Every complete run record of the run set of ``results_dir`` (temporary and lock files are skipped)."""
    records = []
    for path in run_files(results_dir):
        try:
            record = read_run(path)
        except (OSError, ValueError):
            print(f"skipping unreadable {path}", file=sys.stderr)
            continue
        if isinstance(record, dict) and record.get("complete") is True and record["evaluation"]["mean"]:
            records.append(record)
    return records
