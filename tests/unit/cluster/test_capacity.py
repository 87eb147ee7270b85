"""cluster/capacity.py and its users: an autoscaling cluster is judged by what it can grow to, not by what is up.

Run: .venv/bin/python -m pytest tests/unit/cluster/test_capacity.py -q
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
import yaml

from raytune_minicpmv.cluster.capacity import (Capacity, cluster_capacity, describe_pending,
                                               max_resources_from_config, pending_resources_loop)
from raytune_minicpmv.config import ConfigError, config_from_dict
from raytune_minicpmv.train.trainer import check_cluster
from raytune_minicpmv.tune.search import max_concurrent_trials

ROOT = Path(__file__).resolve().parents[3]
HEAD_ONLY = {"CPU": 32.0, "trial_driver": 100.0, "memory": 1e11, "node:10.0.0.1": 1.0}  # GPU nodes not up yet


def _cfg(**sections):
    return config_from_dict(sections, check_paths=False)


@pytest.fixture()
def cluster_yaml(tmp_path) -> str:
    """The shipped cluster.yaml, as `ray up` leaves it on the head (~/ray_bootstrap_config.yaml)."""
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text((ROOT / "cluster.yaml").read_text())
    return str(path)


def test_max_size_of_the_shipped_cluster_yaml():
    # head: 32 CPU, 0 GPU, 100 trial_driver; gpu_h100: max 2 × (192 CPU, 8 GPU); the spot type has max_workers 0
    got = max_resources_from_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    assert got == {"CPU": 32 + 2 * 192, "GPU": 16, "trial_driver": 100, "accelerator_type:H100": 2}


def test_the_global_max_workers_caps_the_node_types():
    config = {"head_node_type": "h", "max_workers": 3,
              "available_node_types": {"h": {"resources": {"CPU": 4}},
                                       "big": {"resources": {"GPU": 8}, "max_workers": 2},
                                       "small": {"resources": {"GPU": 1, "CPU": 2}, "max_workers": 5}}}
    # 3 nodes at most: for GPUs the two 8-GPU nodes first, then one 1-GPU node; for CPUs three small nodes
    assert max_resources_from_config(config) == {"CPU": 4 + 3 * 2, "GPU": 8 + 8 + 1}


def test_capacity_sources_in_order(cluster_yaml, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))
    named = cluster_capacity(_cfg(ray={"autoscaling_config": cluster_yaml}), now=HEAD_ONLY)
    assert named.autoscaling and named.source == cluster_yaml and named.max["GPU"] == 16
    assert named.now == HEAD_ONLY
    fixed = cluster_capacity(_cfg(), now=HEAD_ONLY)  # no config anywhere, no Ray connected: a fixed cluster
    assert not fixed.autoscaling and fixed.max == fixed.now
    # `ray up`'s head: found without any setting
    home = tmp_path / "home"
    home.mkdir()
    (home / "ray_bootstrap_config.yaml").write_text(Path(cluster_yaml).read_text())
    monkeypatch.setenv("HOME", str(home))
    found = cluster_capacity(_cfg(), now=HEAD_ONLY)
    assert found.autoscaling and found.source.endswith("ray_bootstrap_config.yaml") and found.max["GPU"] == 16
    off = cluster_capacity(_cfg(ray={"autoscaling_config": ""}), now=HEAD_ONLY)
    assert not off.autoscaling


def test_an_unreadable_cluster_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="ray.autoscaling_config: cannot read the cluster config"):
        cluster_capacity(_cfg(ray={"autoscaling_config": str(tmp_path / "missing.yaml")}), now=HEAD_ONLY)
    (tmp_path / "x.json").write_text(json.dumps({"cluster_name": "x"}))
    with pytest.raises(ConfigError, match="not a Ray cluster config"):
        cluster_capacity(_cfg(ray={"autoscaling_config": str(tmp_path / "x.json")}), now=HEAD_ONLY)


def test_resource_check_waits_for_gpus_an_autoscaling_cluster_can_add(cluster_yaml, caplog):
    """Before: 'scaling: 8 workers need 8 GPU, the cluster has 0' refused every job submitted to cluster.yaml."""
    c = _cfg(scaling={"num_workers": 8, "cpus_per_worker": 8})
    cap = cluster_capacity(_cfg(ray={"autoscaling_config": cluster_yaml}), now=HEAD_ONLY)
    with caplog.at_level(logging.WARNING):
        check_cluster(c, cap)
    assert "8 GPU (up now: 0, can grow to 16)" in caplog.text and "wait for the autoscaler to add" in caplog.text
    assert "64 CPU (up now: 32, can grow to 416)" in caplog.text  # the head's CPUs are not enough either: a wait
    with pytest.raises(ConfigError, match=r"need 24 GPU, the cluster can grow to 16 \(.*ray_bootstrap"):
        check_cluster(_cfg(scaling={"num_workers": 24, "cpus_per_worker": 8}), cap)  # never fits: still refused
    with pytest.raises(ConfigError, match="need 8 GPU, the cluster has 0"):
        check_cluster(c, HEAD_ONLY)  # a fixed cluster without GPUs: refused as before


def test_tune_concurrency_comes_from_the_max_size_not_from_what_is_up(cluster_yaml, caplog):
    """Before: 'the cluster has 0 GPUs now (autoscaling from zero?); set it explicitly'."""
    cap = cluster_capacity(_cfg(ray={"autoscaling_config": cluster_yaml}), now=HEAD_ONLY)
    with caplog.at_level(logging.INFO):
        assert max_concurrent_trials(_cfg(scaling={"num_workers": 4}), cap) == 4  # 16 GPUs / 4 per trial
    assert "from what the cluster can grow to (16 GPU" in caplog.text
    with pytest.raises(ConfigError, match="one trial needs 32 GPU, the cluster can grow to 16"):
        max_concurrent_trials(_cfg(scaling={"num_workers": 32}), cap)
    standin = _cfg(scaling={"use_gpu": False, "num_workers": 1, "cpus_per_worker": 1,
                            "resources_per_worker": {"gpu_standin": 1}})
    sim = Capacity({"CPU": 2.0}, {"CPU": 6.0, "gpu_standin": 2.0}, "sim")
    assert max_concurrent_trials(standin, sim) == 2  # the stand-in binds, not the CPUs
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert max_concurrent_trials(_cfg(scaling={"num_workers": 8}, tune={"max_concurrent_trials": 3}), cap) == 3
    assert "exceeds the 16 the cluster can grow to" in caplog.text


def test_standin_resources_are_asked_by_every_worker():
    c = _cfg(scaling={"use_gpu": False, "cpus_per_worker": 1, "resources_per_worker": {"gpu_standin": 1}})
    assert c.worker_resources == {"CPU": 1.0, "gpu_standin": 1.0}
    with pytest.raises(ConfigError, match="scaling.resources_per_worker: custom resources only"):
        _cfg(scaling={"resources_per_worker": {"GPU": 1}})


def test_the_pending_line_names_what_is_missing_and_what_is_launching():
    pgs = [{"name": "", "bundles": [{"unit_resources": {"CPU": 1.0, "gpu_standin": 1.0}}]},
           {"name": "", "bundles": [{"unit_resources": {"CPU": 1.0, "gpu_standin": 1.0}}]}]
    cap = Capacity({"CPU": 2.0, "trial_driver": 100.0}, {"CPU": 6.0, "gpu_standin": 2.0}, "autoscaling.json")
    assert describe_pending(pgs, cap, {"gpu_h100": 2}) == (
        "waiting for resources: 2 placement group(s) need {CPU: 2, gpu_standin: 2}; the cluster has "
        "{gpu_standin: 0} now; can grow to {CPU: 6, gpu_standin: 2}; autoscaler launching 2 × gpu_h100")
    fixed = Capacity({"CPU": 2.0}, {"CPU": 2.0})
    assert describe_pending(pgs[:1], fixed, {}) == ("waiting for resources: 1 placement group(s) need "
                                                   "{CPU: 1, gpu_standin: 1}; the cluster has {gpu_standin: 0} now")


def test_the_pending_loop_reports_a_wait_then_its_end():
    lines, polls = [], iter([None, "waiting A", "waiting A", "waiting A", "waiting B", None, None])
    stop = threading.Event()

    def poll():
        try:
            return next(polls)
        except StopIteration:
            stop.set()
            return None

    pending_resources_loop(stop, poll, interval_s=0.001, after_s=0.0, emit=lines.append)
    # printed when it starts and when it changes, not on every poll; then once when it is over
    assert lines == ["waiting A", "waiting B", "resources: the pending placement groups are placed"]


def test_ray_data_never_asks_the_autoscaler_for_nodes():
    """Ray Data's rate-based cluster autoscaler asks for more nodes (on cluster.yaml: GPU nodes) once utilization
    passes 50 %. The CLI and every worker of our runs get thresholds that no utilization reaches (Ray Data reads
    them at import); before, a full cluster was not "low" and triggered a request."""
    import subprocess
    import sys

    from raytune_minicpmv import cluster
    from raytune_minicpmv.cluster.capacity import RAY_DATA_NO_SCALE_UP

    assert RAY_DATA_NO_SCALE_UP.items() <= cluster.runtime_env_vars(_cfg()).items()
    code = ("import os\n"
            "from raytune_minicpmv.cli import main\n"
            "try:\n    main(['configs', 'ls'])\nexcept SystemExit:\n    pass\n"
            "from ray.data._internal.cluster_autoscaler.rate_based_cluster_autoscaler import "
            "RateBasedClusterAutoscaler as R\n"
            "from ray.data._internal.cluster_autoscaler.resource_utilization_gauge import ClusterUtil\n"
            "print(R._is_cluster_utilization_low(type('A', (), {'_cluster_scaling_up_util_threshold': "
            "R.DEFAULT_CLUSTER_SCALING_UP_UTIL_THRESHOLD})(), ClusterUtil(1.0, 1.0, 1.0, 1.0)))\n")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("RAY_DATA_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "True", out.stdout + out.stderr  # a full cluster is "low"
