"""Fixtures shared by the integration tests (local Ray on CPU)."""
from __future__ import annotations

import pytest

from tests.ray_teardown import shutdown_ray


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray per test module (2 CPUs, DeepSpeed on its CPU accelerator); each module pays ray.init once."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    shutdown_ray()
