"""Cluster: connecting to Ray (embedded local Ray or a running cluster), storage checks, Ray Jobs submission.

    from raytune_minicpmv.cluster import init_ray, check_storage
    ray = init_ray(cfg)          # idempotent; a local Ray unless an address is configured
    check_storage(cfg.run)       # refuses node-local storage on a multi-node cluster

`ray_session.py` (init, address, runtime env, storage check), `jobs.py` (submit / status / logs / stop).
Every stage may import this package; it imports only `config`.
"""
from .ray_session import check_storage, driver_resources, init_ray, runtime_env_vars

__all__ = ["init_ray", "check_storage", "driver_resources", "runtime_env_vars"]
