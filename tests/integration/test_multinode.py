"""A real 2-node Ray cluster on this machine (two `ray start` processes, token auth, Jobs server), driven only through
the `raytune-minicpmv submit/status/logs` CLI, the way an operator drives a cloud cluster.

- the tune stage submitted as a job runs to success; checkpoints and the merged model land in the shared storage path
- a node-local storage path is refused by the storage check (node 2 is told to see a private copy of one prefix,
  which is what a node without the NFS mount sees; the check itself is the production code)
- a submission without the token, or with a wrong one, is refused and creates no job
- a running job can be stopped; following it then exits 1

Run: .venv/bin/python -m pytest tests/integration/test_multinode.py -q      (about 3-4 minutes on 2 cores)
Processes are stopped by process group and by this cluster's unique token, never with `ray stop` (which would also
kill other Ray clusters of this machine).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from raytune_minicpmv.cluster.ray_session import SIMULATE_NODE_LOCAL_ENV

pytestmark = [pytest.mark.slow, pytest.mark.long]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The demo recipe, shrunk to one short trial: the point here is the cluster plumbing, not the search.
SMALL_TUNE = ["tune.num_samples=1", "train.max_steps=2", "train.eval_steps=2", "train.save_steps=2",
              "optim.warmup_steps=0", "train.logging_steps=1", "train.eval_max_batches=1", "merge.verify_samples=1"]


@dataclass
class Cluster:
    root: Path
    token: str
    dashboard: str = ""
    gcs: str = ""
    env: dict = field(default_factory=dict)
    pgids: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    head_node_id: str = ""

    @property
    def shared(self) -> Path:
        return self.root / "shared"

    @property
    def node_local(self) -> Path:
        return self.root / "nodelocal"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(args: list[str], env: dict, c: Cluster, check: bool = True) -> None:
    # Own session: every daemon `ray start` leaves behind keeps this process group, which teardown kills.
    p = subprocess.Popen([str(BIN / "ray"), "start", *args, "--disable-usage-stats",
                          "--object-store-memory", str(300 * 2**20)],
                         env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    c.pgids.append(p.pid)
    out, _ = p.communicate(timeout=180)
    # `ray start` gives a raylet 30 s to register; on a loaded 2-core machine it can register later, so a worker
    # start is judged by the node count instead (_wait_for_nodes).
    assert p.returncode == 0 or not check, out


def _cli(c: Cluster, *args: str, env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "raytune-minicpmv"), *args], env=env or c.env, cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout)


def _wait_for_nodes(c: Cluster, n: int, timeout: float = 120) -> str:
    """Wait until n nodes are alive; return the head's node id."""
    from raytune_minicpmv.cluster.jobs import alive_nodes

    deadline, seen = time.time() + timeout, "the dashboard did not answer"
    while time.time() < deadline:
        try:  # the dashboard may still be starting when `ray start` returns
            nodes = alive_nodes(c.dashboard, headers={"authorization": f"Bearer {c.token}"})
        except Exception as e:  # noqa: BLE001 - keep polling until the deadline, report the last reason
            seen = repr(e)
        else:
            if len(nodes) >= n:
                return next(node["node_id"] for node in nodes if node["is_head_node"])
            seen = f"{len(nodes)} of {n} nodes alive"
        time.sleep(1)
    raise AssertionError(f"cluster not up after {timeout:.0f} s: {seen}")


def _kill_cluster(c: Cluster) -> None:
    for pgid in c.pgids:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    time.sleep(3)
    # Whatever escaped the process groups (job drivers, workers) still carries this cluster's unique token.
    marker = f"RAY_AUTH_TOKEN={c.token}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") and int(pid) != os.getpid():
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    for pgid in c.pgids:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def two_node_cluster():
    """Start the head and the second node; yield the Cluster; stop and remove everything. Also used by
    benchmarks/jobs_overhead.py."""
    # A short root: Ray's unix sockets live under it and must fit in 107 characters.
    c = Cluster(root=Path(tempfile.mkdtemp(prefix="rtm-mn-", dir="/tmp")), token=secrets.token_hex(16))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=c.token, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", DS_ACCELERATOR="cpu")
    try:
        gcs_port, dash_port = _free_port(), _free_port()
        c.dashboard = f"http://127.0.0.1:{dash_port}"
        # Ray's own State API clients (Train's placement-group cleaner) otherwise look for "the" Ray instance of this
        # machine and fail when other clusters run here too; a real node runs one Ray.
        env["RAY_API_SERVER_ADDRESS"] = c.dashboard
        # Head: the CPU driver node of cluster.yaml in miniature (no GPU, the trial_driver resource).
        _ray_start(["--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
                    "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
                    "--dashboard-agent-listen-port", str(_free_port()), "--ray-client-server-port", str(_free_port()),
                    "--metrics-export-port", str(_free_port()), "--temp-dir", str(c.root / "ray"),
                    "--num-cpus", "1", "--num-gpus", "0", "--resources", '{"trial_driver": 100}'], env, c)
        c.gcs = (c.root / "ray" / "ray_current_cluster").read_text().strip()
        # Worker node: a second raylet on the same machine, with its own temp dir (as a real node has its own disk:
        # sharing one, the two runtime-env agents would delete each other's unpacked working dirs); it does not
        # share the `nodelocal` prefix.
        _ray_start(["--address", c.gcs, "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", str(c.root / "ray2"),
                    "--dashboard-agent-listen-port", str(_free_port()), "--metrics-export-port", str(_free_port())],
                   {**env, SIMULATE_NODE_LOCAL_ENV: str(c.node_local)}, c, check=False)
        c.env = env
        c.head_node_id = _wait_for_nodes(c, 2)
        yield c
    finally:
        _kill_cluster(c)
        shutil.rmtree(c.root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    with two_node_cluster() as c:
        c.inputs = _demo_inputs(c.shared / "inputs")
        yield c


def _demo_inputs(root: Path) -> dict[str, str]:
    """The demo's tiny model and sample data, fewer records: 2 steps × 2 workers × micro-batch 2 = 8 train records."""
    from raytune_minicpmv.models import build_tiny
    from raytune_minicpmv.data.sample_data import write_sample_dataset

    build_tiny("minicpmv2_6", root / "tiny-minicpmv2_6")
    return {"model.path": str(root / "tiny-minicpmv2_6"),
            "data.train_path": str(write_sample_dataset(root / "data", "train", num_records=8)),
            "data.eval_path": str(write_sample_dataset(root / "data", "eval", num_records=4))}


def _tune_cmd(c: Cluster, name: str, storage: Path) -> list[str]:
    inputs = [f"{k}={v}" for k, v in c.inputs.items()]
    return ["raytune-minicpmv", "tune", "--config", "configs/demo.yaml", *inputs, *SMALL_TUNE,
            f"run.name={name}", f"run.storage_path={storage}"]


def test_a_submission_without_the_right_token_is_refused(cluster, tmp_path):
    no_token = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    no_token["HOME"] = str(tmp_path)  # and no ~/.ray/auth_token to fall back on
    r = _cli(cluster, "submit", "--", "echo", "hi", env=no_token)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "refused" in r.stderr and "Unauthorized" in r.stderr
    r = _cli(cluster, "submit", "--", "echo", "hi", env={**no_token, "RAY_AUTH_TOKEN": "not-the-token"})
    assert r.returncode == 2 and "Forbidden" in r.stderr, r.stdout + r.stderr
    # Nothing was created: with the token, the job list is empty.
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard, headers={"authorization": f"Bearer {cluster.token}"})
    assert not [j for j in client.list_jobs() if j.entrypoint == "echo hi"]


def test_a_node_local_storage_path_is_refused(cluster):
    r = _cli(cluster, "submit", "--follow", "--", *_tune_cmd(cluster, "local", cluster.node_local / "runs"),
             timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "is node-local: 1 of 2 nodes" in out and "run.storage_path=s3://" in out, out
    assert not (cluster.node_local / "runs" / "local").exists(), "refused before any work was written"


def test_tune_job_on_two_nodes_writes_checkpoints_and_the_merged_model_to_shared_storage(cluster):
    storage = cluster.shared / "runs"
    r = _cli(cluster, "submit", "--follow", "--submission-id", "mn-tune", "--",
             *_tune_cmd(cluster, "mn", storage))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert r.stdout.splitlines()[0] == "mn-tune"
    assert "is shared by all 2 nodes" in out, "the storage check ran against both nodes"

    status = json.loads(_cli(cluster, "status", "mn-tune").stdout)
    assert status["status"] == "SUCCEEDED"
    assert status["driver_node_id"] == cluster.head_node_id, "the driver runs on the CPU head (trial_driver)"

    adapters = list(storage.glob("**/checkpoint_*/adapter/adapter_model.safetensors"))
    assert adapters, f"no trial checkpoint under {storage}"
    merged = storage / "mn" / "merged"
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors")), sorted(storage.rglob("*"))
    assert _cli(cluster, "logs", "mn-tune").stdout.count("merged model:") >= 1


def test_a_job_can_be_stopped_and_following_it_then_fails(cluster):
    r = _cli(cluster, "submit", "--submission-id", "mn-sleep", "--", "sleep", "300")
    assert r.returncode == 0 and r.stdout.strip() == "mn-sleep", r.stdout + r.stderr
    deadline = time.time() + 60
    while json.loads(_cli(cluster, "status", "mn-sleep").stdout)["status"] != "RUNNING":
        assert time.time() < deadline, "the job never started"
        time.sleep(1)
    r = _cli(cluster, "stop", "mn-sleep")
    assert r.returncode == 0 and "stop requested" in r.stdout
    r = _cli(cluster, "logs", "mn-sleep", "--follow", timeout=60)
    assert r.returncode == 1 and "STOPPED" in r.stderr, r.stdout + r.stderr
    assert _cli(cluster, "status", "no-such-job").returncode == 2
