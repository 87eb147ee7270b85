"""Tune results → trial records → the best trial: pure functions over Ray Tune's results, no Tuner.

    from raytune_minicpmv.tune.selection import collect_trials, select_best
    trials = collect_trials(result_grid, cfg)             # status finished / stopped / error, history, time
    best = select_best(trials, "eval_loss", "min")        # by the best *checkpointed* evaluation

`search.py` runs the search and calls these; `report.py` renders them.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Optional

from ..config import Config, TrainConfig, TuneConfig

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "checkpoint_path"


@dataclass(frozen=True)
class BestTrial:
    trial_id: str
    config: dict
    metric: float
    step: int
    checkpoint_path: str


def reports_per_trial(train_cfg: TrainConfig) -> int:
    """ASHA's time unit is one evaluation report; a full trial makes this many."""
    return max(1, train_cfg.max_steps // train_cfg.eval_steps)


def full_trial_reports(tune_cfg: TuneConfig, train_cfg: TrainConfig) -> int:
    """The reports a trial makes when nothing stops it early: `tune.max_t`, else one per evaluation."""
    return tune_cfg.max_t or reports_per_trial(train_cfg)


@dataclass
class TrialRecord:
    trial_id: str
    config: dict
    history: list[dict]  # every forwarded (evaluation) result, in order
    status: str  # finished | stopped | error
    error: Optional[str]
    time_s: float


def collect_trials(results, cfg: Config) -> list[TrialRecord]:
    full = full_trial_reports(cfg.tune, cfg.train)
    out = []
    for r in results:
        df = r.metrics_dataframe
        history = [] if df is None else df.to_dict("records")
        n = len(history)
        # a trial restored after an interrupt restarts its Tune history but resumes its Train run: its last step
        # tells whether it ran to the end
        last_step = int(history[-1].get("step", 0)) if history else 0
        status = "error" if r.error else ("finished" if n >= full or last_step >= cfg.train.max_steps else "stopped")
        trial_id = (r.metrics or {}).get("trial_id") or os.path.basename(r.path)
        t = float(history[-1].get("time_total_s", 0.0)) if history else 0.0
        out.append(TrialRecord(trial_id=str(trial_id), config=dict(r.config), history=history, status=status,
                               error=str(r.error) if r.error else None, time_s=t))
    return out


def select_best(trials: list[TrialRecord], metric: str, mode: str) -> BestTrial:
    """Best over each trial's best *checkpointed* evaluation (not its last). Ties: earlier step, then trial id."""
    candidates = []
    for t in trials:
        for row in t.history:
            v, ck = row.get(metric), row.get(CHECKPOINT_KEY)
            if v is None or ck is None or not isinstance(ck, str) or not math.isfinite(float(v)):
                continue
            key = float(v) if mode == "min" else -float(v)
            candidates.append((key, int(row.get("step", 0)), t.trial_id, float(v), ck, t.config))
    if not candidates:
        errors = [f"{t.trial_id}: {t.error.splitlines()[0] if t.error else t.status}" for t in trials]
        raise RuntimeError("no trial reported a checkpointed evaluation of "
                           f"{metric!r}; every trial failed or stopped before its first evaluation:\n  "
                           + "\n  ".join(errors or ["(no trials ran)"]))
    candidates.sort(key=lambda c: (c[0], c[1], c[2]))
    if len(candidates) > 1 and candidates[0][0] == candidates[1][0] and candidates[0][2] != candidates[1][2]:
        log.warning("tie on %s=%g between trials %s and %s; taking %s (earlier step, then trial id)",
                    metric, candidates[0][3], candidates[0][2], candidates[1][2], candidates[0][2])
    _, step, trial_id, value, ck, config = candidates[0]
    return BestTrial(trial_id=trial_id, config=config, metric=value, step=step, checkpoint_path=ck)
