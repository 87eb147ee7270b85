"""Tune stage: a Ray Tune learning-rate search (ASHA) whose trials are TorchTrainer runs, then the merge of the best.

    from raytune_minicpmv.tune import run_tune
    summary = run_tune(cfg)

Inside: `search.py` (the Tuner, trial drivers, concurrency), `selection.py` (trial records, best-trial choice),
`report.py` (results table, plot, report.md).
"""
from .search import run_tune

__all__ = ["run_tune"]
