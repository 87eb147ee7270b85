"""`collect_trials`: Ray Tune results → TrialRecords (status, id, history, time), on real `ray.tune.Result` objects
(no cluster). Mutation testing found no test reaching it (docs/TESTING.md).

    .venv/bin/python -m pytest tests/unit/tune/test_tune_collect.py -q
"""
from __future__ import annotations

import pandas as pd
from ray.tune import Result

from raytune_minicpmv.config import config_from_dict
from raytune_minicpmv.tune.selection import collect_trials


def _result(n_evals, trial_id="t1", error=None, path="/runs/r-tune/trial_dir_7"):
    rows = [{"step": 10 * (i + 1), "eval_loss": 2.0 - 0.1 * i, "time_total_s": 4.5 * (i + 1)} for i in range(n_evals)]
    metrics = {"config": {"lr": 1e-4}, **({"trial_id": trial_id} if trial_id else {})}
    return Result(metrics=metrics, checkpoint=None, error=error, path=path,
                  metrics_dataframe=pd.DataFrame(rows) if n_evals else None)


def test_status_by_number_of_reports_and_error():
    cfg = config_from_dict({"train": {"max_steps": 30, "eval_steps": 10}}, check_paths=False)  # 3 reports
    done, stopped, failed = collect_trials(
        [_result(3, "a"), _result(2, "b"), _result(1, "c", error=RuntimeError("boom\nat line 3"))], cfg)
    assert (done.trial_id, done.status, done.error) == ("a", "finished", None)
    assert (stopped.status, failed.status, failed.error) == ("stopped", "error", "boom\nat line 3")
    assert done.config == {"lr": 1e-4} and [r["step"] for r in done.history] == [10, 20, 30]
    assert done.time_s == 13.5 and stopped.time_s == 9.0  # the last report's wall time


def test_tune_max_t_sets_what_finished_means():
    cfg = config_from_dict({"train": {"max_steps": 30, "eval_steps": 10}, "tune": {"max_t": 2}}, check_paths=False)
    assert [t.status for t in collect_trials([_result(2), _result(1)], cfg)] == ["finished", "stopped"]


def test_trial_without_reports_or_id():
    cfg = config_from_dict({}, check_paths=False)
    (t,) = collect_trials([_result(0, trial_id=None)], cfg)
    assert (t.trial_id, t.history, t.time_s, t.status) == ("trial_dir_7", [], 0.0, "stopped")


def test_reports_without_wall_time_count_as_zero_seconds():
    cfg = config_from_dict({}, check_paths=False)
    result = Result(metrics={"config": {}}, checkpoint=None, error=None, path="/x/t",
                    metrics_dataframe=pd.DataFrame([{"step": 10, "eval_loss": 1.0}]))
    (t,) = collect_trials([result], cfg)
    assert t.time_s == 0.0 and t.history == [{"step": 10, "eval_loss": 1.0}]
