"""Test-suite settings: one torch thread per test process (the suite runs under pytest-xdist on 2 cores)."""

import torch as th

th.set_num_threads(1)
