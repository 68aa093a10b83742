"""Running a study with many workers: its shared storage (:mod:`~sb3_trpo.tuning.storage`) and
workers stopped by a signal (:mod:`~sb3_trpo.tuning.signals`). The search spaces are in
:mod:`sb3_trpo.hyperparams`."""
