"""The run-directory lock between driver processes (real processes, no Ray): a live holder is named and refused, a
dead one is taken over, and the object-store lease follows its heartbeat."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from raytune_minicpmv.cluster.runlock import HOLDER_FILE, RunLockedError, run_lock


def hold_in_child(run_dir, ready):
    """A child process that takes the lock, says so, and sleeps until killed."""
    code = textwrap.dedent(f"""
        import time
        from raytune_minicpmv.cluster.runlock import run_lock
        with run_lock({str(run_dir)!r}, command="train"):
            open({str(ready)!r}, "w").close()
            time.sleep(120)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ))
    for _ in range(200):
        if ready.exists():
            return child
        time.sleep(0.05)
    child.kill()
    raise AssertionError("the child never took the lock")


def test_second_driver_is_refused_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    child = hold_in_child(run_dir, tmp_path / "ready")
    try:
        t0 = time.monotonic()
        with pytest.raises(RunLockedError) as e:
            with run_lock(str(run_dir), command="train"):
                pass
        assert time.monotonic() - t0 < 5  # refused at once, not after a wait
        assert f"pid {child.pid}" in str(e.value) and "in use by train on host" in str(e.value)
        assert str(run_dir) in str(e.value)
    finally:
        child.kill()
        child.wait()


def test_lock_of_a_killed_driver_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    child = hold_in_child(run_dir, tmp_path / "ready")
    child.send_signal(signal.SIGKILL)  # no cleanup: the marker and holder file stay behind
    child.wait()
    assert (run_dir / HOLDER_FILE).exists()
    with run_lock(str(run_dir), command="train"):
        assert json.loads((run_dir / HOLDER_FILE).read_text())["pid"] == os.getpid()
    assert not (run_dir / HOLDER_FILE).exists()  # released on exit


def test_lock_is_released_when_the_block_raises(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with run_lock(str(tmp_path), command="tune"):
            1 / 0
    with run_lock(str(tmp_path), command="tune"):
        pass


def test_object_store_lease_refuses_a_fresh_holder_and_takes_an_expired_one(tmp_path):
    from raytune_minicpmv.cluster import runlock

    uri = f"file://{tmp_path}"  # through pyarrow's filesystem, as for s3:// or gs://
    holder = tmp_path / HOLDER_FILE
    holder.write_text(json.dumps({"host": "node-a", "pid": 7, "command": "tune", "since": "x",
                                  "heartbeat": time.time()}))
    with pytest.raises(RunLockedError, match="tune on host node-a pid 7"):
        with run_lock(uri, command="train"):
            pass
    holder.write_text(json.dumps({"host": "node-a", "pid": 7, "heartbeat": time.time() - runlock.LEASE_S - 1}))
    with run_lock(uri, command="train"):
        assert json.loads(holder.read_text())["pid"] == os.getpid()
    assert not holder.exists()
