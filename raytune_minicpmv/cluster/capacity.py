"""What the cluster has now and what it can grow to, and a watcher that says what a run is waiting for.

    from raytune_minicpmv.cluster.capacity import cluster_capacity, pending_resources_watch
    cap = cluster_capacity(cfg)        # Capacity(now={...}, max={...}, source="...")
    with pending_resources_watch(cfg):  # prints "waiting for resources: ..." while our placement groups are pending
        trainer.fit()

On an autoscaling cluster the GPU nodes are not up when a job starts: `ray.cluster_resources()` then shows the CPU
head only, so a check against it would refuse every job, and a Tune concurrency derived from it would be wrong. What
the cluster can grow to comes from, in order (`ray.autoscaling_config`):

1. the config file named by `ray.autoscaling_config` (cluster.yaml's format: available_node_types + max_workers);
2. the autoscaler's own report in the GCS (autoscaler v2 and KubeRay publish their node groups' min/max; the
   `ray up` autoscaler, v1, does not) — what Ray Train and Ray Data read too;
3. `~/ray_bootstrap_config.yaml` on the driver's node: `ray up` writes the cluster config there on the head, where
   `raytune-minicpmv submit` runs the job driver;
4. none of these: a fixed cluster (max = now). `ray.autoscaling_config=""` forces this.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..config import Config, ConfigError

log = logging.getLogger(__name__)

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` puts the cluster config on the head

# Ray Data's own cluster autoscaler (RATE_BASED in Ray 2.60) asks the Ray autoscaler for more nodes whenever the
# cluster's utilization passes 50 %, and re-sends that request for its executor's lifetime plus 180 s. With
# cluster.yaml (no CPU worker type) that can boot GPU nodes for the CPU preprocessing (tests/integration/
# test_autoscaling.py launched a third node before this was set). Our Ray Data work is sized for the nodes that are
# there (the head; the Train workers' nodes), so it never asks: its scale-up thresholds are set above any
# utilization. Environment variables, because Ray Data reads them when it is imported; a value set by the operator
# wins.
RAY_DATA_NO_SCALE_UP = {f"RAY_DATA_DEFAULT_CLUSTER_SCALING_UP_{kind}_UTIL_THRESHOLD": "1000000"
                        for kind in ("CPU", "GPU", "MEMORY", "OBJECT_STORE_MEMORY")}


def ray_data_scale_up_env() -> dict[str, str]:
    """The variables above, with the operator's own values where set (for `runtime_env_vars`)."""
    return {k: os.environ.get(k, v) for k, v in RAY_DATA_NO_SCALE_UP.items()}


def keep_ray_data_from_scaling() -> None:
    """In the driver, before `ray.data` is imported (cli.main)."""
    for key, value in RAY_DATA_NO_SCALE_UP.items():
        os.environ.setdefault(key, value)
_IGNORED = ("memory", "object_store_memory")  # node sizes, not what our workers ask for


@dataclass(frozen=True)
class Capacity:
    now: dict[str, float]  # ray.cluster_resources(): the nodes that are up
    max: dict[str, float]  # what the cluster can grow to (== now on a fixed cluster)
    source: str = ""  # where `max` came from; "" on a fixed cluster

    @property
    def autoscaling(self) -> bool:
        return bool(self.source)


def max_resources_from_config(config: dict) -> dict[str, float]:
    """Total resources when every worker type is at its max_workers (within the global max_workers), plus the head.

    For each resource the global cap goes to the node types with the most of it first (the largest amount the
    autoscaler could bring up), the bound Tune concurrency and the resource check need."""
    types = config.get("available_node_types") or {}
    head_type = config.get("head_node_type")
    total: dict[str, float] = {}
    for key, value in ((types.get(head_type) or {}).get("resources") or {}).items():
        total[key] = total.get(key, 0.0) + float(value)
    workers = [(spec.get("resources") or {}, int(spec.get("max_workers", 0) or 0))
               for name, spec in types.items() if name != head_type]
    cap = int(config.get("max_workers", sum(n for _, n in workers)))
    keys = {k for res, _ in workers for k in res}
    for key in keys:
        left, amount = cap, 0.0
        for res, n in sorted(workers, key=lambda w: -float(w[0].get(key, 0))):
            take = min(n, left)
            amount += take * float(res.get(key, 0))
            left -= take
        total[key] = total.get(key, 0.0) + amount
    return {k: v for k, v in total.items() if k not in _IGNORED}


def _read_config_file(path: str) -> dict:
    import yaml

    try:  # YAML is a superset of the JSON Ray also writes
        config = yaml.safe_load(Path(path).expanduser().read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError([f"ray.autoscaling_config: cannot read the cluster config {path}: {e}"]) from None
    if not isinstance(config, dict) or not isinstance(config.get("available_node_types"), dict):
        raise ConfigError([f"ray.autoscaling_config: {path} is not a Ray cluster config (no available_node_types)"])
    return config


def _reported_max() -> Optional[dict[str, float]]:
    """The autoscaler's report in the GCS (v2 / KubeRay), as Ray Train reads it; None when none is reported."""
    try:
        from ray._private.state import state

        reported = state.get_max_resources_from_cluster_config()
    except Exception as e:  # noqa: BLE001 - a private API: treat any failure as "not reported"
        log.debug("no cluster config from the GCS: %r", e)
        return None
    if not reported:
        return None
    return {k: float(min(v, 1e18)) for k, v in reported.items() if k not in _IGNORED}


def cluster_capacity(cfg: Config, now: Optional[dict] = None) -> Capacity:
    """Capacity of the connected cluster (call after `init_ray`); see the module docstring for the order."""
    if now is None:
        import ray

        now = ray.cluster_resources()
    now = {k: float(v) for k, v in now.items()}
    setting = cfg.ray.autoscaling_config
    if setting == "":
        return Capacity(now, now)
    if setting:
        path = str(Path(setting).expanduser())
        return Capacity(now, _at_least_now(max_resources_from_config(_read_config_file(path)), now), path)
    reported = _reported_max()
    if reported:
        return Capacity(now, _at_least_now(reported, now), "the autoscaler's cluster config (GCS)")
    bootstrap = Path(BOOTSTRAP_CONFIG).expanduser()
    if bootstrap.is_file():
        return Capacity(now, _at_least_now(max_resources_from_config(_read_config_file(str(bootstrap))), now),
                        str(bootstrap))
    return Capacity(now, now)


def _at_least_now(max_: dict[str, float], now: dict[str, float]) -> dict[str, float]:
    """Nodes added by hand (or resources the config does not list) count too."""
    out = dict(max_)
    for k, v in now.items():
        if k not in _IGNORED and not k.startswith("node:"):
            out[k] = max(out.get(k, 0.0), v)
    return out


def fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


# --------------------------------------------------------------------------------------------------------------
# Waiting for resources


def describe_pending(pending: list[dict], capacity: Capacity, launching: dict[str, int]) -> str:
    """One line: what our pending placement groups ask for, what the cluster has and can have, what is launching.

    `pending`: State API placement groups ({"name", "bundles": [{"unit_resources": {...}}]}); `launching`: node
    type → count the autoscaler is bringing up."""
    need: dict[str, float] = {}
    for pg in pending:
        for b in pg.get("bundles") or []:
            for k, v in (b.get("unit_resources") or {}).items():
                need[k] = need.get(k, 0.0) + float(v)
    parts = [f"waiting for resources: {len(pending)} placement group(s) need {fmt(need)}"]
    scarce = {k: capacity.now.get(k, 0.0) for k in need if capacity.now.get(k, 0.0) < need[k]}
    if scarce:
        parts.append(f"the cluster has {fmt(scarce)} now")
    if capacity.autoscaling:
        parts.append(f"can grow to {fmt({k: capacity.max.get(k, 0.0) for k in need})}")
        parts.append("autoscaler launching " + (", ".join(f"{n} × {t}" for t, n in sorted(launching.items()))
                                                if launching else "nothing yet"))
    return "; ".join(parts)


def _autoscaler_launching() -> dict[str, int]:
    """Node type → count being launched, from the autoscaler's status (what `ray status` shows as Pending)."""
    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
    except Exception as e:  # noqa: BLE001 - status only: never fail a run over it
        log.debug("no autoscaler status: %r", e)
        return {}
    out = dict(report.get("pending_launches") or {})
    for _ip, node_type, _status in report.get("pending_nodes") or []:
        out[node_type] = out.get(node_type, 0) + 1
    return out


def _our_pending_placement_groups() -> list[dict]:
    """PENDING placement groups created by this job (the Train worker groups of our runs/trials)."""
    import ray
    from ray.util.state import list_placement_groups

    job = ray.get_runtime_context().get_job_id()
    pgs = list_placement_groups(address=_dashboard_url(), filters=[("state", "=", "PENDING"),
                                                                   ("creator_job_id", "=", job)],
                                detail=True, raise_on_missing_output=False)
    return [p.asdict() for p in pgs]


def _dashboard_url() -> str:
    """This cluster's dashboard (the State API); without an address Ray would pick any Ray of this machine."""
    import ray

    url = ray._private.worker.get_dashboard_url()
    if not url:
        raise RuntimeError("this Ray has no dashboard (ray.include_dashboard=false): no State API")
    return url if "://" in url else f"http://{url}"


def pending_resources_loop(stop: threading.Event, poll: Callable[[], Optional[str]], interval_s: float,
                           after_s: float, repeat_s: float = 30.0, emit: Callable[[str], None] = print) -> None:
    """Emit `poll()`'s line once something has been pending for `after_s` (placement groups are pending for a moment
    even on a cluster that has the resources), then on every change and at least every `repeat_s`; stop when `stop`
    is set. `poll` returns None when nothing is pending."""
    since, last, last_t = None, None, 0.0
    while not stop.wait(interval_s):
        try:
            line = poll()
        except Exception as e:  # noqa: BLE001 - the watcher must never break the run it watches
            log.debug("pending-resources poll failed: %r", e)
            continue
        now = time.monotonic()
        if line is None:
            if last is not None:
                emit("resources: the pending placement groups are placed")
            since, last = None, None
            continue
        since = since or now
        if now - since >= after_s and (line != last or now - last_t >= repeat_s):
            emit(line)
            last, last_t = line, now


@contextlib.contextmanager
def pending_resources_watch(cfg: Config, interval_s: float = 1.0, after_s: float = 2.0) -> Iterator[None]:
    """Around `fit()`: print what our pending placement groups wait for (needs the dashboard's State API)."""
    capacity = cluster_capacity(cfg)

    def poll() -> Optional[str]:
        pending = _our_pending_placement_groups()
        if not pending:
            return None
        return describe_pending(pending, cluster_capacity(cfg), _autoscaler_launching() if capacity.autoscaling
                                else {})

    stop = threading.Event()
    emit = lambda line: print(line, flush=True)  # noqa: E731
    thread = threading.Thread(target=pending_resources_loop, args=(stop, poll, interval_s, after_s, 30.0, emit),
                              name="pending-resources", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval_s + 5)


def release_autoscaling_requests() -> int:
    """Cancel the resource requests left at Ray's autoscaling coordinator once our run or search has ended.

    Ray Train's controller and Ray Data's executors register what they need with a detached coordinator actor, which
    forwards it to the autoscaler (`ray status`: "From request_resources"); each request expires 180 s after its last
    refresh. A trial's data executor (Train's SplitCoordinator) dies with the trial and never cancels its request,
    so the trials' GPU nodes stayed up for 3 minutes past their end (seen in tests/integration/test_autoscaling.py:
    `{'gpu_standin': 1.0, 'CPU': 1.0}: 2 from request_resources()`, no demand, both nodes idle). Requesters that
    are still running (another job's) refresh theirs within 20 s. Returns how many were cancelled; never raises."""
    try:
        import ray

        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
        ids = ray.get(coordinator.__ray_call__.remote(lambda actor: list(actor._ongoing_reqs)), timeout=30)
        ray.get([coordinator.cancel_request.remote(i) for i in ids], timeout=30)
    except Exception as e:  # noqa: BLE001 - no coordinator (nothing requested), or a Ray without this internal
        log.debug("no autoscaling requests released: %r", e)
        return 0
    if ids:
        log.info("released %d autoscaling request(s) left by the finished runs: idle nodes can scale down", len(ids))
    return len(ids)


def trials_that_fit(per_trial: dict[str, float], resources: dict[str, float]) -> tuple[int, str]:
    """How many trials of `per_trial` fit in `resources`, and the resource that binds."""
    best, binding = None, ""
    for key, amount in per_trial.items():
        if amount <= 0:
            continue
        n = int(math.floor(float(resources.get(key, 0.0)) / amount + 1e-9))
        if best is None or n < best:
            best, binding = n, key
    return (best or 0), binding

