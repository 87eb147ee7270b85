"""benchmarks/real_path.py's runner keeps what a killed run printed and enforces its deadline while the run is silent;
its config holds absolute paths whatever --work was given as.

A `train --profile` run on the GPU machine was killed by the call's outer `timeout` and left a 0-byte log (Python
had buffered it), so the session's last device minutes showed nothing; and the runner's own deadline was only
checked when a line arrived, so a silent run outlived it. The retry with `--work .gpuwork` (relative) failed at
once: the CLI read the config's relative paths against the config file's folder, `.gpuwork/.gpuwork/...`.

Run: pytest tests/unit/benchmarks/test_real_path_runner.py   (~5 s)
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

import real_path  # noqa: E402

SILENT_AFTER_ONE_LINE = [sys.executable, "-u", "-c", "import time; print('step 1 | loss 2.0', flush=True); "
                         "time.sleep(60)"]


def test_a_silent_run_is_killed_at_its_deadline_and_keeps_its_lines(tmp_path):
    t0 = time.monotonic()
    rc, lines, wall = real_path.run_teed(SILENT_AFTER_ONE_LINE, dict(os.environ), tmp_path / "run.log", timeout=2)
    assert time.monotonic() - t0 < 20 and wall < 20  # not the child's 60 s
    assert rc != 0
    assert [x for _, x in lines] == ["step 1 | loss 2.0\n"]
    assert (tmp_path / "run.log").read_text() == "step 1 | loss 2.0\n"


def test_the_log_holds_each_line_while_the_run_goes_on(tmp_path):
    """What an outer `timeout` kill leaves: the runner itself killed mid-run still wrote every line so far."""
    log = tmp_path / "run.log"
    code = ("import os, pathlib, sys; sys.path.insert(0, 'benchmarks'); import real_path; "
            f"real_path.run_teed({SILENT_AFTER_ONE_LINE!r}, dict(os.environ), pathlib.Path({str(log)!r}), 60)")
    runner = subprocess.Popen([sys.executable, "-c", code], cwd=real_path.REPO)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (log.exists() and log.read_text()):
            time.sleep(0.1)
        runner.kill()  # as `timeout -s KILL` would: no chance to flush anything
        runner.wait()
        assert log.read_text() == "step 1 | loss 2.0\n"
    finally:
        runner.kill()


def test_the_config_paths_are_absolute_for_a_relative_work_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = real_path.base_config(Path(".gpuwork"), use_gpu=True)
    paths = [cfg["data"]["train_path"], cfg["data"]["eval_path"], cfg["data"]["output_path"], cfg["model"]["path"],
             cfg["run"]["storage_path"]]
    assert all(Path(x).is_absolute() and Path(x).is_relative_to(tmp_path / ".gpuwork") for x in paths), paths
