"""What a rerun of a run directory resumes from, checked by the driver before Ray Train starts.

    plan = prepare_resume(cfg)          # ConfigError on incompatible config changes
    if plan.finished: ...               # "already finished at step N"

Ray Train V2 resumes from `<run_dir>/checkpoint_manager_snapshot.json`: the list of reported checkpoints and the
latest one, handed to the workers as `ray.train.get_checkpoint()`. Ray does not look inside a checkpoint, so a
truncated file only fails in `torch.load` inside every retry, and a deleted checkpoint directory stops the run in
the controller (`CheckpointManagerInitializationError`). Here, before `fit`:

1. every checkpoint of the snapshot is verified against its completeness markers (`checkpoint.verify_checkpoint`);
   bad ones are named, moved aside to `<name>.bad-<time>` and dropped from the snapshot (the original is kept as
   `checkpoint_manager_snapshot.json.bak-<time>`), the newest complete one becomes the latest: the run resumes from
   it (from step 0 when none is left);
2. the run config stored in that checkpoint is compared with the new one: changes that the saved weights, optimizer
   state or data position cannot follow are refused, listing the keys; the others are applied and printed;
3. a run whose latest checkpoint is at `train.max_steps` or later is reported as finished, not rerun.

Local and shared-filesystem run dirs only; on an object store Ray's snapshot is used as is (the workers still
verify the checkpoint before loading it).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Optional

import yaml

from .checkpoint import CONFIG_FILE, read_train_state, verify_checkpoint
from ..config import Config, ConfigError, is_uri, join_uri

log = logging.getLogger(__name__)

SNAPSHOT = "checkpoint_manager_snapshot.json"  # ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

# Config keys whose change a resume applies (prefix match on dotted keys). Everything else that differs from the
# checkpoint's config is refused: the model, its trainable parts and LoRA shape (the saved tensors would not fit),
# the data and its preprocessing (the data position would point into other rows), the optimizer and schedule
# settings (their state is restored from the checkpoint, so a new optim.lr would silently not apply), the batch
# geometry, ZeRO stage, offload and the worker count (DeepSpeed's per-rank shards).
APPLIED = (
    "run.storage_path", "ray.", "train.max_steps", "train.eval_steps", "train.eval_max_batches", "train.logging_steps",
    "train.save_steps", "train.save_total_limit", "train.max_failures", "train.fail_at_step", "train.report_to",
    "scaling.cpus_per_worker", "scaling.accelerator_type", "scaling.check_resources",
    "scaling.resources_per_worker", "data.output_path",
    "data.preprocessed", "data.map_batch_size", "data.num_cpus_per_task", "data.max_tasks", "data.max_skip_fraction",
    "deepspeed.overlap_comm", "deepspeed.reduce_bucket_size", "tune.", "merge.", "model.attn_implementation",
    "model.packed_attention",  # a kernel choice, like attn_implementation (data.packing itself: batch geometry)
)


@dataclass
class ResumePlan:
    checkpoint: Optional[str] = None  # the directory the run resumes from (None: from step 0)
    step: int = 0
    finished: bool = False
    metrics: dict = field(default_factory=dict)  # what the checkpoint was reported with (Ray's snapshot)
    applied: dict = field(default_factory=dict)  # key -> (old, new)
    dropped: list = field(default_factory=list)  # problems of the checkpoints moved aside


def prepare_resume(cfg: Config, run_name: Optional[str] = None, check_config: bool = True) -> ResumePlan:
    """Repair the snapshot (bad checkpoints out), check the config against the resumed checkpoint's, see if done."""
    run_dir = join_uri(cfg.run.storage_path, run_name or cfg.run.name)
    plan = ResumePlan()
    if is_uri(run_dir):
        return plan
    latest, plan.dropped = repair_snapshot(run_dir)
    if latest is None:
        return plan
    plan.checkpoint = os.path.join(run_dir, latest)
    plan.step = read_train_state(plan.checkpoint).step
    plan.metrics = _reported_metrics(run_dir, latest)
    if check_config:
        plan.applied = check_config_change(cfg, plan.checkpoint)
    plan.finished = plan.step >= cfg.train.max_steps
    return plan


def repair_snapshot(run_dir: str) -> tuple[Optional[str], list[str]]:
    """(checkpoint dir name the run resumes from or None, problems of the checkpoints dropped)."""
    if not os.path.isdir(run_dir):
        return None, []
    path = os.path.join(run_dir, SNAPSHOT)
    snap = _read_json(path) if os.path.exists(path) else None
    results = (snap or {}).get("checkpoint_results") or []
    problems, good = [], []
    for r in results:
        bad = verify_checkpoint(os.path.join(run_dir, r["checkpoint_dir_name"]))
        (problems.extend(bad) if bad else good.append(r["checkpoint_dir_name"]))
    orphan, partial = _orphans(run_dir, snap, good)
    if not problems and orphan is None and not partial:
        return ((snap or {}).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name"), []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in [r["checkpoint_dir_name"] for r in results if r["checkpoint_dir_name"] not in good] + list(partial):
        if os.path.isdir(os.path.join(run_dir, name)):
            # out of the way: a later save of the same step must not land among the damaged files
            os.rename(os.path.join(run_dir, name), os.path.join(run_dir, f"{name}.bad-{stamp}"))
    problems += [p for ps in partial.values() for p in ps]
    if os.path.exists(path):
        shutil.copyfile(path, f"{path}.bak-{stamp}")
    snap = _filtered(snap or _empty_snapshot(), set(good))
    if orphan is not None:
        _adopt(snap, run_dir, orphan)
    _write_snapshot(path, snap)
    latest = (snap["latest_checkpoint_result"] or {}).get("checkpoint_dir_name")
    if problems:
        log.warning("checkpoints that cannot be resumed from were moved aside (<name>.bad-%s):\n  %s\nresuming "
                    "from %s", stamp, "\n  ".join(problems), latest or "step 0 (no complete checkpoint left)")
    return latest, problems


def _reported_metrics(run_dir: str, name: str) -> dict:
    for r in (_read_json(os.path.join(run_dir, SNAPSHOT)) or {}).get("checkpoint_results", []):
        if r["checkpoint_dir_name"] == name:
            return dict(r.get("metrics") or {})
    return {}


def _orphans(run_dir: str, snap: Optional[dict], good: list[str]) -> tuple[Optional[str], dict[str, list[str]]]:
    """Checkpoint dirs Ray never registered: (the newest complete one if newer than every registered one, the
    incomplete ones with their problems). A run stopped (Ctrl-C, SIGTERM) between a worker's report and the
    controller's bookkeeping leaves a complete one; a kill during the save leaves an incomplete one."""
    known = {r["checkpoint_dir_name"] for r in (snap or {}).get("checkpoint_results", [])}
    newest = max((_step_of(snap, n) for n in good), default=0)
    found, partial = [], {}
    for name in sorted(os.listdir(run_dir)):
        d = os.path.join(run_dir, name)
        if not name.startswith("checkpoint_") or "." in name or name in known or not os.path.isdir(d):
            continue
        problems = verify_checkpoint(d)
        if problems:
            partial[name] = problems
        elif read_train_state(d).step > newest:
            found.append((read_train_state(d).step, name))
    return (max(found)[1] if found else None), partial


def _adopt(snap: dict, run_dir: str, name: str) -> None:
    step = read_train_state(os.path.join(run_dir, name)).step
    metrics = {"step": step}
    for row in _read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
        if row.get("step") == step:
            metrics.update(row)  # eval_loss etc.: Ray orders kept checkpoints by it
    result = {"version": 0, "checkpoint_dir_name": name, "metrics": metrics}
    snap["checkpoint_results"].append(result)
    snap["checkpoint_report_indices"].append(int(snap["current_report_index"]))
    snap["current_report_index"] = int(snap["current_report_index"]) + 1
    snap["latest_checkpoint_result"] = result
    log.info("adopting %s (step %d): saved before the run stopped, not yet registered by Ray Train", name, step)


def _empty_snapshot() -> dict:
    import ray

    return {"ray_version": ray.__version__, "checkpoint_results": [], "checkpoint_report_indices": [],
            "latest_checkpoint_result": None, "pending_training_results": [], "pending_validation_specs": [],
            "current_report_index": 0, "validated_checkpoint_dir_names": [],
            "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:  # a snapshot cut short: rebuilt from the newest complete checkpoint
        log.warning("%s is unreadable (%s); rebuilding it from the checkpoints on disk", path, e)
        return None


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def _step_of(snap: Optional[dict], name: str) -> int:
    for r in (snap or {}).get("checkpoint_results", []):
        if r["checkpoint_dir_name"] == name:
            return int(r.get("metrics", {}).get("step", 0))
    return 0


def _filtered(snap: dict, good: set[str]) -> dict:
    """Ray's snapshot without the dropped checkpoints; the newest remaining one (by step) becomes the latest."""
    out = dict(snap)
    pairs = [(r, i) for r, i in zip(snap["checkpoint_results"], snap["checkpoint_report_indices"])
             if r["checkpoint_dir_name"] in good]
    out["checkpoint_results"] = [r for r, _ in pairs]
    out["checkpoint_report_indices"] = [i for _, i in pairs]
    out["latest_checkpoint_result"] = max((r for r, _ in pairs), key=lambda r: int(r["metrics"].get("step", 0)),
                                          default=None)
    keep = [(r, v) for r, v in zip(snap.get("pending_training_results", []), snap.get("pending_validation_specs", []))
            if r["checkpoint_dir_name"] in good]
    out["pending_training_results"] = [r for r, _ in keep]
    out["pending_validation_specs"] = [v for _, v in keep]
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        out[key] = [n for n in snap.get(key, []) if n in good]
    return out


def _write_snapshot(path: str, snap: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(snap, f)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------
# Config changes


def check_config_change(cfg: Config, ckpt_dir: str) -> dict:
    """Refuse incompatible changes against the checkpoint's config (ConfigError listing the keys); return the
    applied ones as {key: (old, new)}."""
    with open(os.path.join(ckpt_dir, CONFIG_FILE)) as f:
        stored = _flatten(yaml.safe_load(f) or {})
    new = _flatten(cfg.to_dict())
    changed = {k: (stored.get(k), new.get(k)) for k in sorted(set(stored) | set(new))
               if _norm(stored.get(k)) != _norm(new.get(k)) and k != "run.name"}
    refused = {k: v for k, v in changed.items() if not k.startswith(APPLIED)}
    if refused:
        raise ConfigError([f"{k}: changed from {old!r} to {new_!r} since checkpoint {ckpt_dir}; a resume cannot apply "
                           "it (see docs/TRAINING.md, 'Rerunning a run'). Undo the change, or start a new run with "
                           "another run.name" for k, (old, new_) in refused.items()])
    return changed


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


# --------------------------------------------------------------------------------------------------------------
# Metrics after a resume


def rewind_history(jsonl_path: Optional[str], tensorboard_dir: Optional[str], step: int) -> None:
    """Rank 0 at (re)start: forget what was logged after the step the run resumes from, so a resumed run has no
    duplicate steps. metrics.jsonl keeps its lines up to `step`; TensorBoard gets a purge event at step + 1 (it then
    drops the older events of later steps; SummaryWriter's documented `purge_step`)."""
    if jsonl_path and os.path.exists(jsonl_path):
        with open(jsonl_path) as f:
            lines = [ln for ln in f if ln.strip()]
        keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
        if len(keep) != len(lines):
            tmp = jsonl_path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, jsonl_path)
    if tensorboard_dir and os.path.isdir(tensorboard_dir):
        from torch.utils.tensorboard import SummaryWriter

        SummaryWriter(log_dir=tensorboard_dir, purge_step=step + 1).close()
