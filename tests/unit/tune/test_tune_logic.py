"""Tune's pure parts: best-trial selection, derived concurrency, trial configs, the report."""
import pytest

from raytune_minicpmv.config import ConfigError, config_from_dict
from raytune_minicpmv.tune.search import max_concurrent_trials, search_space, trial_config
from raytune_minicpmv.tune.selection import TrialRecord, select_best
from raytune_minicpmv.tune.report import format_table, trial_rows, write_tune_report


def _cfg(**sections):
    return config_from_dict(sections, check_paths=False)


def _trial(tid, lr, evals, status="finished"):
    hist = [{"step": s, "eval_loss": v, "checkpoint_path": f"/ck/{tid}/{s}" if ck else None} for s, v, ck in evals]
    return TrialRecord(trial_id=tid, config={"lr": lr}, history=hist, status=status, error=None, time_s=10.0)


def test_best_is_each_trials_best_checkpoint_not_last():
    a = _trial("a", 1e-4, [(10, 2.0, True), (20, 1.5, True), (30, 1.9, True)])  # best 1.5, last 1.9
    b = _trial("b", 1e-3, [(10, 1.7, True), (20, 1.6, True)], status="stopped")  # last 1.6 < a's last
    best = select_best([a, b], "eval_loss", "min")
    assert (best.trial_id, best.metric, best.step, best.checkpoint_path) == ("a", 1.5, 20, "/ck/a/20")
    assert select_best([a, b], "eval_loss", "max").metric == 2.0


def test_best_skips_evaluations_without_checkpoint_and_nan():
    a = _trial("a", 1e-4, [(10, 0.5, False), (20, 1.2, True)])
    b = _trial("b", 1e-3, [(10, float("nan"), True)])
    assert select_best([a, b], "eval_loss", "min").checkpoint_path == "/ck/a/20"


def test_tie_prefers_earlier_step_then_trial_id(caplog):
    a = _trial("b", 1e-4, [(20, 1.0, True)])
    b = _trial("a", 1e-3, [(20, 1.0, True)])
    c = _trial("c", 1e-2, [(10, 1.0, True)])
    assert select_best([a, b, c], "eval_loss", "min").trial_id == "c"
    assert select_best([a, b], "eval_loss", "min").trial_id == "a"
    assert "tie" in caplog.text


def test_all_failed_is_a_clear_error():
    t = TrialRecord("x", {"lr": 1e-3}, [], "error", "RuntimeError: boom\ntraceback", 0.0)
    with pytest.raises(RuntimeError, match=r"(?s)every trial failed.*x: RuntimeError: boom"):
        select_best([t], "eval_loss", "min")


def test_concurrency_derived_and_validated():
    cpu = _cfg(scaling={"use_gpu": False, "num_workers": 2, "cpus_per_worker": 0.9})
    assert max_concurrent_trials(cpu, {"CPU": 2.0}) == 1
    assert max_concurrent_trials(cpu, {"CPU": 8.0}) == 4
    with pytest.raises(ConfigError, match="one trial needs"):
        max_concurrent_trials(cpu, {"CPU": 1.0})
    gpu = _cfg(scaling={"num_workers": 2})
    assert max_concurrent_trials(gpu, {"GPU": 8.0, "CPU": 100}) == 4
    with pytest.raises(ConfigError, match="autoscaling from zero"):
        max_concurrent_trials(gpu, {"CPU": 8.0})
    fixed = _cfg(scaling={"num_workers": 2}, tune={"max_concurrent_trials": 3})
    assert max_concurrent_trials(fixed, {"CPU": 8.0}) == 3


def test_trial_config_and_space():
    cfg = _cfg(tune={"search": {"lr": [1e-5, 1e-4, 1e-3], "lr_sampler": "grid", "lora_r": [8, 16]}})
    space = search_space(cfg.tune)
    assert space["lr"] == {"grid_search": [1e-5, 1e-4, 1e-3]} and space["lora_r"] == {"grid_search": [8, 16]}
    t = trial_config(cfg, {"lr": 3e-4, "lora_r": 16})
    assert t.optim.lr == 3e-4 and t.lora.r == 16 and t.lora.alpha == 16 and cfg.optim.lr != 3e-4


def test_report_files(tmp_path):
    cfg = _cfg(run={"name": "r"}, scaling={"use_gpu": False, "num_workers": 2})
    trials = [_trial("a", 1e-4, [(10, 2.0, True), (20, 1.5, True)]),
              _trial("b", 1e-2, [(10, 3.0, True)], status="stopped")]
    best = select_best(trials, "eval_loss", "min")
    summary = write_tune_report(str(tmp_path), trials, best, cfg, 12.0)
    assert summary["best_trial"] == "a" and summary["stopped"] == 1 and summary["total_steps"] == 30
    for f in ("report.md", "results.json", "tune_results.png"):
        assert (tmp_path / f).stat().st_size > 0
    table = format_table(trial_rows(trials, cfg), "eval_loss", "worker")
    assert table.index("| a |") < table.index("| b |") and "stopped" in table
