"""Entry point: ``python -m sb3_trpo.benchmark {speed,report} [options]``.

The returns campaign runner is the repository's ``python -m benchmarks.returns``, not part of the wheel.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "speed": "sb3_trpo.benchmark.speed",
    "report": "sb3_trpo.benchmark.report",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m sb3_trpo.benchmark {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
