"""Seed studies: train several variants of a model with several seeds, same recipe, and compare them.

:mod:`.runs` is the bookkeeping (run files, locks, resume, train -> contract -> check -> score),
:mod:`.stats` the statistics (mean +- std, Welch's t-test), :mod:`.compare` the ``expandctl compare``
study built on them and :mod:`.report` its report (the verb: :func:`expandctl.workflows.compare.compare`).
``examples/reproduce.py`` and ``examples/figures.py`` run through the same engine.
"""

from .runs import Lock, Trained, check_settings, claim, finish_run, read_run, read_runs, train_contracted
from .stats import mean_std, welch_p

__all__ = [
    "Lock",
    "Trained",
    "check_settings",
    "claim",
    "finish_run",
    "read_run",
    "read_runs",
    "train_contracted",
    "mean_std",
    "welch_p",
]
