"""The repository's benchmark campaigns, outside the wheel: ``python -m benchmarks.returns`` from a checkout."""
