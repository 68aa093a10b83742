"""Benchmarks of sb3_trpo against sb3-contrib: ``python -m sb3_trpo.benchmark {speed,report}``."""
