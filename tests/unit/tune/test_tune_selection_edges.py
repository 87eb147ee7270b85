"""Best-trial selection and derived concurrency: edges tests/unit/tune/test_tune_logic.py does not pin (found by
mutation testing, docs/TESTING.md): rows that are not candidates, the tie warning, the failure message, the
driver's share of a trial's resources, exact fits, and the over-subscription warning.

    .venv/bin/python -m pytest tests/unit/tune/test_tune_selection_edges.py -q
"""
from __future__ import annotations

import logging

import pytest

from raytune_minicpmv.config import ConfigError, config_from_dict
from raytune_minicpmv.tune.search import max_concurrent_trials
from raytune_minicpmv.tune.selection import TrialRecord, select_best


def _trial(tid, rows, status="finished", error=None):
    return TrialRecord(trial_id=tid, config={"lr": 1e-4}, history=rows, status=status, error=error, time_s=1.0)


def test_rows_that_are_not_checkpointed_finite_evaluations_are_skipped():
    bad = _trial("bad", [{"step": 1, "eval_loss": float("nan"), "checkpoint_path": "/ck/nan"},
                         {"step": 2, "eval_loss": 0.1, "checkpoint_path": 7},  # not a path
                         {"step": 3, "checkpoint_path": "/ck/no-metric"},
                         {"step": 4, "eval_loss": 0.2, "checkpoint_path": None}])
    good = _trial("good", [{"step": 5, "eval_loss": 3.0, "checkpoint_path": "/ck/good"}])
    best = select_best([bad, good], "eval_loss", "min")
    assert (best.trial_id, best.checkpoint_path, best.metric) == ("good", "/ck/good", 3.0)
    assert best.config == {"lr": 1e-4}  # the winner's hyperparameters reach the merge and the report


def test_a_row_without_step_counts_as_step_0():
    best = select_best([_trial("a", [{"eval_loss": 1.0, "checkpoint_path": "/ck/a"}])], "eval_loss", "min")
    assert best.step == 0


def test_the_tie_warning_names_metric_value_and_both_trials(caplog):
    rows = lambda tid: [{"step": 10, "eval_loss": 1.25, "checkpoint_path": f"/ck/{tid}"}]  # noqa: E731
    with caplog.at_level(logging.WARNING):
        assert select_best([_trial("b", rows("b")), _trial("a", rows("a"))], "eval_loss", "min").trial_id == "a"
    assert caplog.messages == ["tie on eval_loss=1.25 between trials a and b; taking a (earlier step, then trial id)"]


def test_no_tie_warning_without_a_tie_between_two_trials(caplog):
    one = _trial("a", [{"step": 10, "eval_loss": 1.0, "checkpoint_path": "/ck/1"},
                       {"step": 20, "eval_loss": 1.0, "checkpoint_path": "/ck/2"}])  # a trial tying with itself
    other = _trial("b", [{"step": 10, "eval_loss": 2.0, "checkpoint_path": "/ck/b"}])
    with caplog.at_level(logging.WARNING):
        assert select_best([one, other], "eval_loss", "min").step == 10
        select_best([other, _trial("c", [{"step": 10, "eval_loss": 3.0, "checkpoint_path": "/ck/c"}])],
                    "eval_loss", "min")
    assert caplog.messages == []


def test_the_failure_message_lists_each_trial_by_error_or_status():
    trials = [_trial("x", [], "error", "RuntimeError: boom\ntraceback"), _trial("y", [], "stopped")]
    with pytest.raises(RuntimeError) as e:
        select_best(trials, "eval_loss", "min")
    assert str(e.value) == ("no trial reported a checkpointed evaluation of 'eval_loss'; every trial failed or "
                            "stopped before its first evaluation:\n  x: RuntimeError: boom\n  y: stopped")
    with pytest.raises(RuntimeError, match=r"evaluation:\n  \(no trials ran\)$"):
        select_best([], "eval_loss", "min")


def _cfg(**sections):
    return config_from_dict(sections, check_paths=False)


def test_the_trial_driver_counts_in_what_one_trial_takes():
    cpu = _cfg(scaling={"use_gpu": False, "num_workers": 2, "cpus_per_worker": 1.0}, tune={"driver_resources": {"CPU": 1.0}})
    assert max_concurrent_trials(cpu, {"CPU": 9.0}) == 3  # 3 CPUs per trial, not 2
    assert max_concurrent_trials(cpu, {"CPU": 3.0}) == 1  # an exact fit runs one trial
    with pytest.raises(ConfigError, match="one trial needs 3 CPUs, the cluster has 2.9"):
        max_concurrent_trials(cpu, {"CPU": 2.9})


def test_a_gpu_trial_on_a_cluster_without_gpus_is_an_error():
    with pytest.raises(ConfigError, match="has 0 GPUs now"):
        max_concurrent_trials(_cfg(scaling={"num_workers": 1}), {"CPU": 8.0})


def test_a_fixed_concurrency_above_the_cluster_warns_only_when_it_does_not_fit(caplog):
    fixed = _cfg(scaling={"num_workers": 2}, tune={"max_concurrent_trials": 3})
    with caplog.at_level(logging.WARNING):
        assert max_concurrent_trials(fixed, {"GPU": 6.0}) == 3  # fits exactly: no warning
        assert max_concurrent_trials(fixed, {"CPU": 8.0}) == 3  # no GPUs yet (autoscaling): no warning either
        assert caplog.messages == []
        assert max_concurrent_trials(fixed, {"GPU": 5.0}) == 3
        assert max_concurrent_trials(fixed, {"GPU": 1.0}) == 3  # one GPU node up so far
    assert caplog.messages == [f"tune.max_concurrent_trials=3 × 2 GPU per trial exceeds the {n} the cluster has now; "
                               "the extra trials wait for the autoscaler" for n in (5, 1)]
