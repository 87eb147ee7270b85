"""cluster.py on a one-node local Ray: driver_resources, check_storage, the State API pin (2-node cases: test_multinode.py).

Run: .venv/bin/python -m pytest tests/integration/test_jobs_local.py -q
"""
from __future__ import annotations

import os
from pathlib import Path

from raytune_minicpmv import cluster
from raytune_minicpmv.config import load_config
from tests.ray_teardown import shutdown_ray


def test_driver_resources_only_when_the_cluster_has_them(tmp_path):
    import ray

    cfg = load_config(None, [f"run.storage_path={tmp_path / 'runs'}"], check_paths=False)
    ray.init(address="local", num_cpus=1, include_dashboard=False, resources={"trial_driver": 2},
             log_to_driver=False)
    try:
        assert cluster.driver_resources(cfg.ray, {"CPU": 0.05}) == {"CPU": 0.05, "trial_driver": 1.0}
        off = load_config(None, ['ray.driver_resource=""'], check_paths=False)
        assert cluster.driver_resources(off.ray, {"CPU": 0.05}) == {"CPU": 0.05}
        cluster.check_storage(cfg.run)  # one node: nothing to compare, passes without writing a marker
        assert not list(Path(cfg.run.storage_path).glob(".storage_check/*"))
    finally:
        shutdown_ray()


def test_a_local_ray_pins_state_api_clients_to_its_own_dashboard():
    """Train V2's placement-group cleaner calls the State API without an address; with a second Ray on the machine
    that lookup fails ("Found multiple active Ray instances") and a trial stopped by ASHA leaks its placement group.
    init_ray points every worker and actor of its local Ray at its own dashboard."""
    import ray

    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    cfg = load_config(None, ["ray.num_cpus=1", "scaling.use_gpu=false"], check_paths=False)
    cluster.init_ray(cfg)
    try:
        @ray.remote(num_cpus=0)
        def state_api_from_a_worker():
            import os

            from ray.util.state import list_nodes

            return os.environ.get("RAY_API_SERVER_ADDRESS"), len(list_nodes())

        url, nodes = ray.get(state_api_from_a_worker.remote())
        assert url and url.startswith("http://127.0.0.1:"), url
        assert nodes == 1
        assert os.environ.get("RAY_API_SERVER_ADDRESS") == before, "the driver's own environment is left alone"
    finally:
        shutdown_ray()
