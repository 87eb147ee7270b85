"""cluster.driver_resources and check_storage on a one-node local Ray (the 2-node cases are in test_multinode.py).

Run: .venv/bin/python -m pytest tests/integration/test_jobs_local.py -q
"""
from __future__ import annotations

from pathlib import Path

from raytune_minicpmv import cluster
from raytune_minicpmv.config import load_config


def test_driver_resources_only_when_the_cluster_has_them(tmp_path, monkeypatch):
    import ray

    monkeypatch.setenv("HOME", str(tmp_path))  # the local Ray writes its auth token under ~/.ray
    cfg = load_config(None, [f"run.storage_path={tmp_path / 'runs'}"], check_paths=False)
    ray.init(address="local", num_cpus=1, include_dashboard=False, resources={"trial_driver": 2},
             log_to_driver=False)
    try:
        assert cluster.driver_resources(cfg, {"CPU": 0.05}) == {"CPU": 0.05, "trial_driver": 1.0}
        off = load_config(None, ['ray.driver_resource=""'], check_paths=False)
        assert cluster.driver_resources(off, {"CPU": 0.05}) == {"CPU": 0.05}
        cluster.check_storage(cfg)  # one node: nothing to compare, passes without writing a marker
        assert not list(Path(cfg.run.storage_path).glob(".storage_check/*"))
    finally:
        ray.shutdown()
