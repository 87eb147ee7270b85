"""Run lifecycle through the real CLI (subprocesses, each with its own local Ray; tiny model, CPU, 4-6 steps):
SIGTERM on `train`, a second driver on the same run dir, a truncated latest checkpoint, config changes and a
finished run on rerun; Ctrl-C on `tune` and its rerun. The scenarios of docs/TRAINING.md, "Run lifecycle".

    flock /tmp/raytest.lock python -m pytest tests/integration/test_lifecycle.py -q
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.long]
ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"
INTERRUPTED = "interrupted — rerun the same command to resume"


def cli(*args):
    return [sys.executable, "-m", "raytune_minicpmv.cli", *args]


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu"}


def run(*args, timeout=420):
    p = subprocess.run(cli(*args), env=env(), capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def wait_for(predicate, timeout=300, proc=None):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended first (rc {proc.returncode}): {proc.stdout.read()[-3000:]}")
        time.sleep(0.3)
    raise AssertionError("timed out")


def steps(jsonl: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in jsonl.read_text().splitlines() if ln.strip()]


def snapshot_names(run_dir: Path) -> list[str]:
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from raytune_minicpmv.demo import prepare_demo_inputs

    root = tmp_path_factory.mktemp("lifecycle")
    paths = prepare_demo_inputs(root)
    return root, [f"{k}={v}" for k, v in paths.items()] + ["ray.include_dashboard=false"]


@pytest.fixture(scope="module")
def sigterm_run(inputs):
    """`train` to 8 steps, stopped by SIGTERM once checkpoints 2 and 4 are registered; a second `train` on the same
    run dir is started while the first one trains."""
    root, paths = inputs
    args = ["train", "--config", str(DEMO), *paths, "run.name=sig", "train.max_steps=8", "train.save_steps=2",
            "train.eval_steps=2", "train.logging_steps=1", "train.save_total_limit=2", "train.eval_max_batches=1"]
    run_dir = root / "runs" / "sig"
    first = subprocess.Popen(cli(*args), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (run_dir / "driver.lock.json").exists(), proc=first)
        second = run(*args, timeout=120)
        wait_for(lambda: "checkpoint_step_0000004" in snapshot_names(run_dir), proc=first)
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    return args, run_dir, first.pid, (first.returncode, out), second


def test_second_driver_on_the_same_run_dir_is_refused_naming_the_holder(sigterm_run):
    _, run_dir, pid, _, (rc, out) = sigterm_run
    assert rc == 2, out
    assert f"{run_dir} is in use by train on host" in out and f"pid {pid}" in out
    assert "Traceback" not in out and "step 1 |" not in out  # refused before Ray started


def test_sigterm_stops_cleanly_keeps_checkpoints_and_the_rerun_resumes(sigterm_run):
    args, run_dir, _, (rc, out), _ = sigterm_run
    assert rc == 143, out[-3000:]  # 128 + SIGTERM, not -6 (SIGABRT) with a C stack dump
    assert INTERRUPTED in out and "stopped by SIGTERM" in out and "the last checkpoint is" in out
    assert "Fatal Python error" not in out and "*** SIGABRT" not in out
    assert "checkpoint_step_0000004" in snapshot_names(run_dir)

    # the newest checkpoint is damaged: the rerun names the file, falls back to an older one and finishes at 8
    latest = max(snapshot_names(run_dir))
    shard = sorted((run_dir / latest / "deepspeed" / "state").glob("*optim_states.pt"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    rc, out = run(*args)
    assert rc == 0, out[-3000:]
    assert str(shard) in out and "truncated" in out
    resumed_from = int(out.split("resuming from step ")[1].split()[0])
    assert 2 <= resumed_from < int(latest[-7:])
    assert steps(run_dir / "metrics.jsonl") == list(range(1, 9))  # no step twice after two resumes
    assert list(run_dir.glob(f"{latest}.bad-*"))

    # a finished run says so, without starting Ray
    rc, out = run(*args, timeout=60)
    assert rc == 0 and "already finished at step 8" in out and "resumed_from_step" not in out

    # config changes a resume cannot apply are refused with their keys, before Ray starts
    rc, out = run(*args, "train.max_steps=10", "optim.lr=5e-2", "lora.r=16", timeout=60)
    assert rc == 2, out
    assert "lora.r: changed from 8 to 16" in out and "optim.lr: changed from 0.001 to 0.05" in out
    assert "Traceback" not in out


def test_ctrl_c_on_tune_merges_nothing_and_the_rerun_completes_and_merges(inputs):
    root, paths = inputs
    args = ["tune", "--config", str(DEMO), *paths, "run.name=tq", "train.max_steps=4", "train.eval_steps=2",
            "train.logging_steps=1", "train.eval_max_batches=1", "tune.num_samples=1", "tune.search.lr_sampler=grid",
            "tune.search.lr=[1e-3]", "merge.verify_samples=1"]
    runs = root / "runs"
    proc = subprocess.Popen(cli(*args), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: any(snapshot_names(d) for d in runs.glob("tq-tune-trial-*")), proc=proc)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert INTERRUPTED in out and "nothing was merged" in out
    assert not (runs / "tq" / "merged").exists() and not (runs / "tq-tune" / "report.md").exists()

    rc, out = run(*args, timeout=600)
    assert rc == 0, out[-3000:]
    assert "merged model:" in out and (runs / "tq" / "merged" / "config.json").exists()
    assert "(1 finished" in out  # the resumed trial ran to max_steps, not "stopped by ASHA"
