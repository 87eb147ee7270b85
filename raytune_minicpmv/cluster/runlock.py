"""One driver per run directory: `train` and `tune` hold a lock on `<storage_path>/<run.name>` while they run.

    with run_lock(cfg.run_dir, command="train"):     # RunLockedError (a ConfigError) naming the holder if taken
        trainer.fit()

Two drivers on one run dir interleave metrics, race on Ray's checkpoint snapshot and leave a run that cannot be
resumed, so the second one is refused before it starts Ray.

Local and shared (NFS/EFS) paths: `filelock.SoftFileLease` (filelock is already a Ray dependency; a lease is a
marker file created with O_EXCL, which is atomic on NFS, unlike flock/fcntl locks whose NFS support depends on the
server). The holder refreshes it from a heartbeat thread; a holder that died on this host (its pid is gone) is
taken over at once, one on another host once its lease has not been refreshed for LEASE_S. Next to the marker,
`driver.lock.json` says who holds it (host, pid, command, since) for the refusal message.

Object stores (s3://, gs://): there is no atomic create-if-absent through pyarrow, so the lock is a best-effort
lease object: refused while another holder's object is younger than LEASE_S; the heartbeat rewrites it. Two
drivers starting within the same second can both get it (documented in docs/TRAINING.md).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Iterator, Optional

from ..config import ConfigError, is_uri, join_uri

log = logging.getLogger(__name__)

LOCK_FILE, HOLDER_FILE = ".driver.lock", "driver.lock.json"
LEASE_S = 60.0  # a holder refreshes every LEASE_S / 3; another host takes a lease unrefreshed for this long


class RunLockedError(ConfigError):
    """Another driver holds this run directory."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        ValueError.__init__(self, "\n".join(problems))


def _holder_info(command: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
            "argv": " ".join(sys.argv), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def describe(holder: Optional[dict]) -> str:
    if not holder:
        return "another driver (holder unknown)"
    return (f"{holder.get('command', 'a driver')} on host {holder.get('host')} pid {holder.get('pid')} "
            f"since {holder.get('since')}")


def _refusal(run_dir: str, holder: Optional[dict]) -> RunLockedError:
    return RunLockedError([
        f"the run directory {run_dir} is in use by {describe(holder)}. Wait for it to finish, stop it "
        f"(Ctrl-C / `raytune-minicpmv stop JOB_ID`), or pick another run.name. A driver that died is detected "
        f"and its lock taken over (at once on the same host, after {LEASE_S:.0f} s from another host)."])


@contextlib.contextmanager
def run_lock(run_dir: str, command: str) -> Iterator[None]:
    """Hold the run directory's lock for the block. Raises RunLockedError when another live driver holds it."""
    if is_uri(run_dir):
        with _object_store_lease(run_dir, command):
            yield
        return
    with _local_lease(run_dir, command):
        yield


@contextlib.contextmanager
def _local_lease(run_dir: str, command: str) -> Iterator[None]:
    import filelock

    os.makedirs(run_dir, exist_ok=True)
    holder_path = os.path.join(run_dir, HOLDER_FILE)
    lease = filelock.SoftFileLease(os.path.join(run_dir, LOCK_FILE), lease_duration=LEASE_S, timeout=0)
    try:
        lease.acquire()  # breaks at once a marker whose pid is dead on this host
    except filelock.Timeout:
        holder = _read_json(holder_path)
        if not holder or holder.get("host") == socket.gethostname():
            raise _refusal(run_dir, holder) from None
        # another host: its lease counts as stale only once it has been seen unrefreshed for LEASE_S
        log.info("run dir %s is locked by %s; waiting up to %.0f s for its lease to expire", run_dir,
                 describe(holder), LEASE_S * 1.2)
        try:
            lease.acquire(timeout=LEASE_S * 1.2)
        except filelock.Timeout:
            raise _refusal(run_dir, holder) from None
    try:
        _write_json(holder_path, _holder_info(command))
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(holder_path)
        lease.release()


@contextlib.contextmanager
def _object_store_lease(run_dir: str, command: str) -> Iterator[None]:
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(run_dir)
    path = join_uri(base, HOLDER_FILE)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        with fs.open_input_stream(path) as f:
            holder = json.loads(f.read().decode() or "{}")
        if time.time() - float(holder.get("heartbeat", 0)) < LEASE_S:
            raise _refusal(run_dir, holder)
        log.warning("taking over the lease of %s on %s: not refreshed for %.0f s", describe(holder), run_dir, LEASE_S)
    me = _holder_info(command)
    stop = threading.Event()

    def write() -> None:
        with fs.open_output_stream(path) as f:
            f.write(json.dumps({**me, "heartbeat": time.time()}).encode())

    def beat() -> None:
        while not stop.wait(LEASE_S / 3):
            with contextlib.suppress(Exception):  # a transient store error must not kill the driver
                write()

    write()
    thread = threading.Thread(target=beat, name="run-lease-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            fs.delete_file(path)


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)
