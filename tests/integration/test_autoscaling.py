"""Autoscaling GPU nodes, simulated on this machine: a tune job submitted to a cluster whose only node is the CPU head
makes the autoscaler launch cluster.yaml's GPU worker type for the trials, and remove it once idle.

The cluster (autoscaling_sim.py): the head of cluster.yaml (CPU, `trial_driver`, no GPU) and its worker types with
min_workers 0, one `gpu_standin` per node standing in for a GPU, max 2 nodes, a 6 s idle timeout. The job (through
`raytune-minicpmv submit`, like on a cloud cluster): 2 trials of the tiny model, 1 CPU train worker each asking for
`gpu_standin`, 2 steps, checkpoints on the shared storage path, then the merge. Asserted: the head alone before, 2
worker nodes for the 2 trials (Tune's concurrency comes from what the cluster can grow to: 0 GPU stand-ins are up at
submit time), the trials' Train workers ran on those nodes, checkpoints and the merged model on shared storage, the
driver said what it waited for, the job SUCCEEDED, and the head alone again after the idle timeout. The timeline is
printed (docs/CLUSTER.md shows one).

Run: flock /tmp/raytest.lock python -m pytest tests/integration/test_autoscaling.py -q -s
(216 s measured on 2 cores; up to 7 minutes when the machine is busy)
"""
from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

from autoscaling_sim import BIN, GPU_STANDIN, ROOT, autoscaling_cluster

pytestmark = [pytest.mark.slow, pytest.mark.long]

TUNE = ["tune.num_samples=2", "tune.max_concurrent_trials=null", "train.max_steps=2", "train.eval_steps=2",
        "train.save_steps=2", "optim.warmup_steps=0", "train.logging_steps=1", "train.eval_max_batches=1",
        "merge.verify_samples=1", "scaling.num_workers=1", "scaling.cpus_per_worker=1",
        f"scaling.resources_per_worker={{{GPU_STANDIN}: 1}}"]


class NodeSampler(threading.Thread):
    """Alive nodes by type, from the State API (what `ray list nodes` reads), twice a second."""

    def __init__(self, dashboard: str, token: str):
        super().__init__(daemon=True)
        self.dashboard, self.headers = dashboard, {"authorization": f"Bearer {token}"}
        self.t0, self.samples, self.stopped = time.time(), [], threading.Event()

    def workers(self) -> int:
        from raytune_minicpmv.cluster.jobs import alive_nodes

        return sum(1 for n in alive_nodes(self.dashboard, headers=self.headers) if not n["is_head_node"])

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            try:
                self.samples.append((time.time() - self.t0, self.workers()))
            except Exception:  # noqa: BLE001 - the dashboard is busy on a loaded machine: skip one sample
                pass

    def timeline(self, events: dict[str, float]) -> list[str]:
        """The worker-count changes, merged with named events (seconds since the sampler started)."""
        rows, last = [], None
        for t, n in self.samples:
            if n != last:
                rows.append((t, f"{n} worker node(s) alive"))
                last = n
        rows += [(t - self.t0, name) for name, t in events.items()]
        return [f"  t={t:6.1f}s  {what}" for t, what in sorted(rows)]


def _cli(c, *args, timeout=400) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "raytune-minicpmv"), *args], env=c.env, cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout)


def _inputs(root) -> list[str]:
    from raytune_minicpmv.data.sample_data import write_sample_dataset
    from raytune_minicpmv.models import build_tiny

    build_tiny("minicpmv2_6", root / "tiny-minicpmv2_6")
    return [f"model.path={root / 'tiny-minicpmv2_6'}",
            f"data.train_path={write_sample_dataset(root / 'data', 'train', num_records=4)}",
            f"data.eval_path={write_sample_dataset(root / 'data', 'eval', num_records=2)}"]


def _train_worker_nodes(c) -> list[str]:
    import requests

    r = requests.get(f"{c.dashboard}/api/v0/actors", headers={"authorization": f"Bearer {c.token}"}, timeout=60,
                     params={"limit": 10000, "detail": "1", "filter_keys": "class_name", "filter_predicates": "=",
                             "filter_values": "RayTrainWorker"})
    r.raise_for_status()
    return [a["node_id"] for a in r.json()["data"]["result"]["result"]]


def _diagnose(c) -> str:
    """`ray status` and what still runs on the worker nodes (actors, placement groups), for a failure message."""
    import requests

    status = subprocess.run([str(BIN / "ray"), "status", "-v", "--address", c.gcs], env=c.env, text=True,
                            capture_output=True, timeout=60).stdout
    headers = {"authorization": f"Bearer {c.token}"}
    alive = {}
    for kind in ("actors", "placement_groups"):
        r = requests.get(f"{c.dashboard}/api/v0/{kind}", headers=headers, timeout=60,
                         params={"limit": 10000, "detail": "1"})
        alive[kind] = [{k: v for k, v in x.items() if k in ("class_name", "state", "node_id", "name", "bundles")}
                       for x in r.json()["data"]["result"]["result"] if x.get("state") not in ("DEAD", "REMOVED")]
    return status + json.dumps(alive, indent=1)[:6000]


def test_a_tune_job_scales_gpu_nodes_up_from_zero_and_back_down(tmp_path):
    with autoscaling_cluster(idle_timeout_minutes=0.1, max_workers=2, gpus_per_node=1) as c:
        sampler = NodeSampler(c.dashboard, c.token)
        assert sampler.workers() == 0, "the cluster starts as the head alone"
        inputs = _inputs(c.shared / "inputs")
        storage = c.shared / "runs"
        sampler.start()
        events = {"submit": time.time()}
        r = _cli(c, "submit", "--follow", "--submission-id", "as-tune", "--",
                 "raytune-minicpmv", "tune", "--config", "configs/demo.yaml", *inputs, *TUNE,
                 f"ray.autoscaling_config={c.root / 'autoscaling.json'}", "run.name=as",
                 f"run.storage_path={storage}")
        events["job finished"] = time.time()
        out = r.stdout + r.stderr
        (tmp_path / "job.log").write_text(out)
        print(f"\njob output: {tmp_path / 'job.log'}")
        assert r.returncode == 0, out[-8000:]
        deadline = time.time() + 60  # idle timeout 6 s + the autoscaler's 1 s loop + the node's shutdown
        while sampler.workers() > 0 and time.time() < deadline:
            time.sleep(0.5)
        events["head alone again" if sampler.workers() == 0 else "(still workers: gave up)"] = time.time()
        time.sleep(1)
        sampler.stopped.set()
        sampler.join()
        print("\nsimulated autoscaling timeline (tune: 2 trials × 1 gpu_standin worker; gpu_h100 max 2):")
        print("\n".join(sampler.timeline(events)))
        if sampler.workers() > 0:
            pytest.fail(f"workers still up 60 s after the job:\n{_diagnose(c)}")

        status = json.loads(_cli(c, "status", "as-tune").stdout)
        assert status["status"] == "SUCCEEDED"
        counts = [n for _, n in sampler.samples]
        assert counts[0] == 0 and max(counts) == 2, sampler.samples  # one node per trial, up from zero
        assert counts[-1] == 0
        up = [t for t, n in sampler.samples if n > 0]
        assert up and up[0] > 0, "workers came only after the job asked for them"

        logs = _cli(c, "logs", "as-tune").stdout
        assert "2 concurrent trials, from what the cluster can grow to (2 gpu_standin" in logs, logs[-4000:]
        assert "waiting for resources:" in logs and GPU_STANDIN in logs, logs[-4000:]
        nodes = _train_worker_nodes(c)
        assert len(nodes) == 2 and len(set(nodes)) == 2, nodes  # each trial's worker on its own new node
        assert status["driver_node_id"] not in nodes, "the job driver stays on the head"

        checkpoints = list(storage.glob("**/checkpoint_*/adapter/adapter_model.safetensors"))
        assert len(checkpoints) == 2, sorted(p.relative_to(storage) for p in storage.rglob("checkpoint_*"))
        merged = storage / "as" / "merged"
        assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))
        assert "merged model:" in logs
