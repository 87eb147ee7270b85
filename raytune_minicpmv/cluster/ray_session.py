"""Connecting to Ray and checking that a multi-node cluster can run us: the embedded local Ray by default, a running
cluster when asked.

    from raytune_minicpmv.cluster.ray_session import init_ray, check_storage
    ray = init_ray(cfg)        # idempotent
    check_storage(cfg.run)     # refuses a node-local run.storage_path on a multi-node cluster

Address precedence: `ray.address` in the config, then the `RAY_ADDRESS` environment variable (set by Ray Jobs for
submitted jobs; an http(s):// RAY_ADDRESS is a dashboard URL for `submit`, not for ray.init, and is skipped), then the
running cluster when the command runs inside a Ray job, else a new local Ray (``address="local"``, so a stray
`ray start` cluster on this machine is never joined by accident). The shipped recipes leave `ray.address` unset: the
same command runs on a laptop (local Ray) and as a submitted job (the cluster).

Inside a Ray Job (``raytune-minicpmv submit``) the job's runtime env (working_dir, env vars chosen at submit time) is
merged with ours; a variable set at submit time wins over the config's value (see `init_ray`).
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid

from . import log_control
from ..config import Config, ConfigError, RayConfig, RunConfig, is_uri, join_uri

log = logging.getLogger(__name__)

# Test hook (never set in production): on a node whose environment has it, paths under this prefix are looked up in
# a node-private directory instead, which simulates a node that does not mount that prefix. It lets a 2-node cluster
# on one machine (where every path is really shared) exercise the refusal below with the real check.
SIMULATE_NODE_LOCAL_ENV = "RAYTUNE_MINICPMV_TEST_NODE_LOCAL_PREFIX"
_MARKER_DIR = ".storage_check"


# Environment every Ray process of ours inherits. Train workers import deepspeed; on CPU-only nodes its accelerator
# auto-detection warns, so pin it when no GPU is used.
def runtime_env_vars(cfg: Config) -> dict[str, str]:
    env = {
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(int(cfg.ray.worker_group_start_timeout_s)),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        # Train V2 mirrors worker print() into its logger as well, so every progress line reached the driver twice
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("NCCL_NVLS_ENABLE", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "TORCH_CUDA_ARCH_LIST",
                "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE"):
        if key in os.environ:
            env[key] = os.environ[key]
    env.update(log_control.worker_env())  # --log-level, applied in every worker by log_control.WORKER_HOOK
    from .capacity import ray_data_scale_up_env

    env.update(ray_data_scale_up_env())  # Train's data feed (its SplitCoordinator actor) never asks for nodes
    return env


def ray_address(ray_cfg: RayConfig) -> str | None:
    """The cluster to join (see the module docstring), or None for a new local Ray."""
    if ray_cfg.address:
        return ray_cfg.address
    env = os.environ.get("RAY_ADDRESS", "")
    if env and not env.startswith(("http://", "https://")):
        return env
    if env:
        log.info("RAY_ADDRESS=%s is a dashboard URL (for `raytune-minicpmv submit`), not a cluster to join", env)
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # a Ray job's driver: its own cluster
        return "auto"
    return None


def init_ray(cfg: Config):
    """Start or join Ray once per process and return the `ray` module."""
    import ray

    # The Train controller reads the start timeout from the environment of the process that calls fit(): Ray Train
    # forwards RAY_TRAIN_* variables of the driver to its controller and workers. setdefault: a value chosen at
    # submit time (`--env`, or the node's environment) wins over the config.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(int(cfg.ray.worker_group_start_timeout_s)))
    if ray.is_initialized():
        return ray
    env = {"env_vars": _without_job_env_vars(runtime_env_vars(cfg)),
           "worker_process_setup_hook": log_control.WORKER_HOOK}
    # Ray's own driver lines (token-auth notice, ...) only at DEBUG; the dashboard URL is logged below
    quiet = {"logging_level": logging.WARNING} if log_control.is_quiet() else {}
    address = ray_address(cfg.ray)
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=env, log_to_driver=True, **quiet)
    else:
        log.info("starting a local Ray (num_cpus=%s)", cfg.ray.num_cpus)
        extra = {}
        if cfg.ray.include_dashboard:
            # Ray's State API clients without an address (Train V2's placement-group cleaner among them) look for
            # "the" Ray instance of this machine and fail when another one runs here (a parallel test session, a
            # `ray start` cluster): the stopped trial's placement group then leaks and the next trial waits forever.
            # Pin every worker and actor of this Ray to our dashboard (runtime env, not this process's environment,
            # which outlives this Ray).
            port = _free_port()
            env["env_vars"]["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
            extra["dashboard_port"] = port
        else:
            log.warning("ray.include_dashboard=false: without the State API, Ray Train cannot free the placement "
                        "group of a stopped trial (its cleaner's repeated warning is hidden below DEBUG)")
        context = ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard,
                           runtime_env=env, log_to_driver=True, **extra, **quiet)
        if context.dashboard_url:
            log.info("local Ray dashboard: http://%s", context.dashboard_url)
    return ray


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _without_job_env_vars(env: dict[str, str]) -> dict[str, str]:
    """Drop the variables a submitted job's runtime env already sets.

    Ray refuses to start a job driver whose `ray.init(runtime_env=...)` sets an env var the job's runtime env also
    sets ("Failed to merge the Job's runtime env"); the job's value is the operator's choice, so it wins.
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return env
    job_env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    return {k: v for k, v in env.items() if k not in job_env}


def driver_resources(ray_cfg: RayConfig, base: dict[str, float],
                     cluster: dict[str, float] | None = None) -> dict[str, float]:
    """`base` plus one unit of the cluster's driver resource (`ray.driver_resource`) when some node advertises it.

    cluster.yaml and the KubeRay manifest give the CPU head `{"trial_driver": 100}`, so Tune trial drivers and the
    merge task asking for it land on the head, never on a (spot) GPU node. A local Ray has no such resource and the
    request stays as given. Call after `init_ray`, or pass `cluster` (`ray.cluster_resources()`).
    """
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    name = ray_cfg.driver_resource
    if not name or name in base or cluster.get(name, 0) < 1:
        return dict(base)
    return {**base, name: 1.0}


# --------------------------------------------------------------------------------------------------------------
# Shared storage


def check_storage(run_cfg: RunConfig, timeout_s: float = 120.0) -> None:
    """Fail fast when `run.storage_path` is not visible from every alive node of a multi-node cluster.

    Checkpoints, Tune results, the preprocessed data and the merged model all live under the storage path, and Ray
    Train writes checkpoints from the worker nodes, so a node-local path only fails later, at the first checkpoint.
    How: the driver writes a marker file with a random token under the storage path, then a zero-CPU task pinned to
    each alive node reads it back. Object-store URIs (s3://, gs://, ...) are shared by construction. A single-node
    cluster passes (an autoscaling cluster that has not added GPU nodes yet is one node: the check is repeated by
    every stage, and Ray's own storage errors stay the backstop). Call after `init_ray`.
    """
    import ray

    path = run_cfg.storage_path
    if path.startswith("file://"):
        path = path[len("file://"):]
    elif is_uri(path):
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    t0 = time.monotonic()
    token = uuid.uuid4().hex
    marker = join_uri(path, _MARKER_DIR, token)
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker, "w") as f:
        f.write(token)
    try:
        missing, silent = _nodes_missing_marker(ray, nodes, marker, token, timeout_s)
    finally:
        os.remove(marker)
    for node in silent:
        log.warning("storage check: node %s did not answer within %.0f s; its view of %s is unchecked",
                    node, timeout_s, path)
    if missing:
        raise ConfigError([
            f"run.storage_path: {path} is node-local: {len(missing)} of {len(nodes)} nodes "
            f"({', '.join(missing)}) do not see the same directory as the driver. On a multi-node cluster "
            "checkpoints, Tune results and the merged model must go to shared storage: use a path of an NFS/EFS/"
            "Filestore mount present at the same path on every node (e.g. run.storage_path=/mnt/shared/runs) or an "
            "object-store URI (run.storage_path=s3://bucket/runs or gs://bucket/runs)."])
    log.info("storage check: %s is shared by all %d nodes (%.1f s)", path, len(nodes), time.monotonic() - t0)


def _nodes_missing_marker(ray, nodes: list[dict], marker: str, token: str, timeout_s: float):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_read_marker)
    refs = {}
    for n in nodes:
        label = f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})"
        strategy = NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
        refs[probe.options(scheduling_strategy=strategy).remote(marker, token)] = label
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    missing = [refs[r] for r in ready if not ray.get(r)]
    return missing, [refs[r] for r in pending]


def _read_marker(marker: str, token: str) -> bool:
    """Runs on one node: does this node see the driver's marker file?"""
    prefix = os.environ.get(SIMULATE_NODE_LOCAL_ENV)
    if prefix and marker.startswith(prefix.rstrip("/") + "/"):
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        marker = f"{prefix.rstrip('/')}.node-{node_id}/{marker[len(prefix):].lstrip('/')}"
    try:
        with open(marker) as f:
            return f.read() == token
    except OSError:
        return False
