"""A local autoscaling Ray cluster derived from cluster.yaml, on this machine (Ray's fake multi-node provider).

Ray ships `ray.cluster_utils.AutoscalingCluster` for this, but its `start()`/`shutdown()` run `ray stop --force`
(which kills every Ray of the machine, other test sessions included), its config template
(`fake_multi_node/example.yaml`) is missing from the 2.60 wheel (so is the autoscaler v2's default config: this is
the v1 autoscaler, the one `ray up` runs), and the provider joins GCS port 6379 unless told
otherwise. So this module does what it does, without those: it writes the same kind of config (provider type
`fake_multinode`, the head as `ray.head.default`; here `SimNodeProvider`, which gives each node its own temp
dir), starts `RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=...` on free ports in its own process group, and stops exactly that group (plus any process
carrying this cluster's unique auth token). The autoscaler then starts real raylets on this machine when it decides
to launch a worker node type, and kills them when they are idle.

Node types come from cluster.yaml: the head keeps head_cpu's custom resources (the trial_driver slots, no GPU);
each worker type keeps its name, min_workers/max_workers and custom resources, with small CPU counts, and its GPUs
turned into a custom stand-in resource (`GPU_STANDIN`, `gpus_per_node` of them) that CPU train workers ask for
(`scaling.resources_per_worker`). The config is written to `<root>/autoscaling.json`, the file the autoscaler reads
(a run names it in `ray.autoscaling_config`, as `ray up`'s head has ~/ray_bootstrap_config.yaml).
"""
from __future__ import annotations

import contextlib
import functools
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

import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GPU_STANDIN = "gpu_standin"
HEAD_TYPE = "ray.head.default"  # the fake provider tags its head with this type name


NODES_DIR_ENV = "RAYTUNE_MINICPMV_SIM_NODES_DIR"


class SimNodeProvider(FakeMultiNodeProvider):
    """Ray's fake multi-node provider, except that every node it starts gets its own temp dir, as a real machine has
    its own disk. Ray's provider starts worker raylets in the head's temp dir (same session dir), and a raylet that
    starts there clears the runtime-env directory of the head, deleting the unpacked working dir of the running job
    (its driver then fails in os.getcwd()). Loaded by the autoscaler as provider `type: external`."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        import ray._private.parameter as parameter

        original = parameter.RayParams
        node_dir = tempfile.mkdtemp(prefix="n", dir=os.environ[NODES_DIR_ENV])  # short: unix socket paths
        parameter.RayParams = functools.partial(original, temp_dir=node_dir)
        try:
            super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
        finally:
            parameter.RayParams = original


@dataclass
class SimCluster:
    root: Path
    token: str
    config: dict
    dashboard: str = ""
    gcs: str = ""
    env: dict = field(default_factory=dict)
    pgids: list = field(default_factory=list)

    @property
    def shared(self) -> Path:
        return self.root / "shared"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sim_config(cluster_yaml: Path, gcs_address: str, *, worker_cpus: float, head_cpus: float,
               idle_timeout_minutes: float, max_workers: int | None = None, gpus_per_node: int | None = None) -> dict:
    """The autoscaling config of the simulation: cluster.yaml's node types on the fake provider."""
    real = yaml.safe_load(cluster_yaml.read_text())
    types = real["available_node_types"]
    head = dict(types[real["head_node_type"]]["resources"])
    head.pop("GPU", None)
    head["CPU"] = head_cpus
    nodes = {HEAD_TYPE: {"resources": head, "node_config": {}, "max_workers": 0}}
    for name, spec in types.items():
        if name == real["head_node_type"]:
            continue
        res = {k: v for k, v in spec["resources"].items() if k not in ("CPU", "GPU")}
        res["CPU"] = worker_cpus
        res[GPU_STANDIN] = spec["resources"].get("GPU", 0) if gpus_per_node is None else gpus_per_node
        res["object_store_memory"] = 150 * 2**20  # the fake provider gives it to the raylet (default: 30% of RAM)
        cap = spec["max_workers"] if max_workers is None else min(spec["max_workers"], max_workers)
        nodes[name] = {"resources": res, "node_config": {}, "min_workers": spec.get("min_workers", 0),
                       "max_workers": cap}
    return {
        "cluster_name": "rtm-autoscale-sim",
        "max_workers": real["max_workers"] if max_workers is None else min(real["max_workers"], max_workers),
        "upscaling_speed": real.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes,
        "docker": {},
        "provider": {"type": "external", "module": "tests.integration.autoscaling_sim.SimNodeProvider",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": nodes,
        "head_node_type": HEAD_TYPE,
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def kill_cluster(c: SimCluster) -> None:
    """Stop this cluster's processes only: its process group, then whatever carries its unique token."""
    for pgid in c.pgids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
    time.sleep(2)
    marker = f"RAY_AUTH_TOKEN={c.token}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(pid) != os.getpid() and marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    for pgid in c.pgids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


@contextlib.contextmanager
def autoscaling_cluster(*, worker_cpus: float = 2, head_cpus: float = 2, idle_timeout_minutes: float = 0.1,
                        max_workers: int | None = 2, gpus_per_node: int | None = 1):
    """Start the simulated cluster (head only: workers come from the autoscaler); yield it; remove everything."""
    c = SimCluster(root=Path(tempfile.mkdtemp(prefix="rtm-as-", dir="/tmp")), token=secrets.token_hex(16),
                   config={})
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=c.token, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", DS_ACCELERATOR="cpu",
               RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
               **{NODES_DIR_ENV: str(c.root / "n")})
    (c.root / "n").mkdir()
    try:
        gcs_port, dash_port = free_port(), free_port()
        c.dashboard = f"http://127.0.0.1:{dash_port}"
        env["RAY_API_SERVER_ADDRESS"] = c.dashboard
        c.gcs = f"127.0.0.1:{gcs_port}"
        c.config = sim_config(ROOT / "cluster.yaml", c.gcs, worker_cpus=worker_cpus, head_cpus=head_cpus,
                              idle_timeout_minutes=idle_timeout_minutes, max_workers=max_workers,
                              gpus_per_node=gpus_per_node)
        cfg_path = c.root / "autoscaling.json"
        cfg_path.write_text(json.dumps(c.config))
        head = c.config["available_node_types"][HEAD_TYPE]["resources"]
        custom = {k: v for k, v in head.items() if k != "CPU"}
        p = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", f"--autoscaling-config={cfg_path}", "--node-ip-address",
             "127.0.0.1", "--port", str(gcs_port), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dash_port), "--dashboard-agent-listen-port", str(free_port()),
             "--ray-client-server-port", str(free_port()), "--metrics-export-port", str(free_port()),
             "--temp-dir", str(c.root / "ray"), "--num-cpus", str(head["CPU"]), "--num-gpus", "0",
             "--resources", json.dumps(custom), "--object-store-memory", str(200 * 2**20),
             "--disable-usage-stats"],
            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        c.pgids.append(p.pid)
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out
        c.env = env
        yield c
    finally:
        kill_cluster(c)
        shutil.rmtree(c.root, ignore_errors=True)
