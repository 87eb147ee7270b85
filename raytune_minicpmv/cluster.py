"""Connecting to Ray: the embedded local cluster by default, a running cluster when asked.

    from raytune_minicpmv.cluster import init_ray
    init_ray(cfg)          # idempotent

Address precedence: `ray.address` in the config, then the `RAY_ADDRESS` environment variable (set by Ray Jobs for
submitted jobs), then a new local Ray (``address="local"``, so a stray `ray start` cluster on this machine is never
joined by accident).
"""
from __future__ import annotations

import logging
import os

from .config import Config

log = logging.getLogger(__name__)

# Environment every Ray process of ours inherits. Train workers import deepspeed; on CPU-only nodes its accelerator
# auto-detection warns, so pin it when no GPU is used.
def runtime_env_vars(cfg: Config) -> dict[str, str]:
    env = {
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(int(cfg.ray.worker_group_start_timeout_s)),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("NCCL_NVLS_ENABLE", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "TORCH_CUDA_ARCH_LIST",
                "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def init_ray(cfg: Config):
    """Start or join Ray once per process and return the `ray` module."""
    import ray

    # The train-controller reads the start timeout from the driver's environment.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(int(cfg.ray.worker_group_start_timeout_s)))
    if ray.is_initialized():
        return ray
    env = {"env_vars": runtime_env_vars(cfg)}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        log.info("starting a local Ray (num_cpus=%s)", cfg.ray.num_cpus)
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard,
                 runtime_env=env, log_to_driver=True)
    return ray
