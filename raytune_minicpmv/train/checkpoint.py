"""Checkpoints of a training run: one reported Ray checkpoint holds everything needed to resume or to merge.

Layout of a checkpoint directory (contract, docs/ARCHITECTURE.md)::

    deepspeed/          engine.save_checkpoint(tag="state"): per-rank ZeRO shards of the trainable weights, their
                        fp32 master copies, optimizer and lr-scheduler state (frozen weights excluded: they come
                        from the base checkpoint). Exact resume.
    adapter/            LoRA runs: adapter_config.json + adapter_model.safetensors (PEFT layout; fully-trained
                        modules such as the resampler as PEFT modules_to_save). Loads with PeftModel.from_pretrained;
                        its auto_mapping names transformers.AutoModel, not our class (docs/MERGE.md).
    full_model/         runs without LoRA: model.safetensors with the trained tensors under checkpoint key names.
    train_state.json    step, data position (epoch, micro-batches consumed in it), tokens seen, best eval loss.
    config.yaml         the resolved run config.
    complete/rank_R.json  completeness marker of rank R, written LAST by that rank: world size and every file the
                        rank wrote with its size. A checkpoint is complete when every rank's marker is there and
                        every listed file has its listed size (`verify_checkpoint`; a crash or a kill mid-save, a
                        truncated or deleted file all show).

Every rank calls `save_checkpoint` (the ZeRO-3 gathers are collectives); each rank writes its own DeepSpeed shards
into its own local directory and Ray merges the ranks' directories in storage (shard file names are per rank).
Only rank 0 writes the consolidated weights and the JSON/YAML files.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
import yaml

DS_DIR, ADAPTER_DIR, FULL_DIR = "deepspeed", "adapter", "full_model"
STATE_FILE, CONFIG_FILE, DS_TAG = "train_state.json", "config.yaml", "state"
MARKER_DIR = "complete"
GATHER_CHUNK_NUMEL = 500_000_000  # gather trainable ZeRO-3 tensors in chunks: bounds the transient GPU memory


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch the next micro-batch comes from
    batch_in_epoch: int = 0  # micro-batches of that epoch already consumed (per rank)
    tokens_seen: float = 0.0  # global label tokens trained on
    best_eval_loss: Optional[float] = None


def save_checkpoint(engine, model: torch.nn.Module, out_dir: str, state: TrainState, config: dict,
                    rank: int) -> None:
    """Write this rank's part of a checkpoint into out_dir (collective: every rank must call it)."""
    engine.save_checkpoint(os.path.join(out_dir, DS_DIR), tag=DS_TAG, exclude_frozen_parameters=True,
                           client_state={"train_state": dataclasses.asdict(state)})
    trained = gather_trainable_state_dict(model, rank)
    if rank == 0:
        _save_rank0_files(model, out_dir, trained, state, config)
    import torch.distributed as dist

    write_marker(out_dir, rank, dist.get_world_size() if dist.is_initialized() else 1)  # last


def _save_rank0_files(model, out_dir: str, trained: dict, state: TrainState, config: dict) -> None:
    if is_peft(model):
        from ..models.adapter_files import save_adapter

        # PEFT filters a full-key state dict to its adapter + modules_to_save keys and renames them.
        save_adapter(model, os.path.join(out_dir, ADAPTER_DIR), state_dict=trained)
    else:
        from safetensors.torch import save_file

        os.makedirs(os.path.join(out_dir, FULL_DIR), exist_ok=True)
        save_file({k: v.contiguous() for k, v in trained.items()},
                  os.path.join(out_dir, FULL_DIR, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, STATE_FILE), "w") as f:
        json.dump(dataclasses.asdict(state), f, indent=2)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)


def write_marker(out_dir: str, rank: int, world: int) -> None:
    """The completeness marker of this rank's part of a checkpoint: call after every other file is written."""
    files = {}
    for root, _, names in os.walk(out_dir):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, out_dir)] = os.path.getsize(path)
    os.makedirs(os.path.join(out_dir, MARKER_DIR), exist_ok=True)
    tmp = os.path.join(out_dir, MARKER_DIR, f".rank_{rank}.tmp")
    with open(tmp, "w") as f:
        json.dump({"rank": rank, "world_size": world, "files": files}, f)
    os.replace(tmp, os.path.join(out_dir, MARKER_DIR, f"rank_{rank}.json"))


class CorruptCheckpointError(RuntimeError):
    """A checkpoint directory is incomplete or damaged (the message names the file)."""


def verify_checkpoint(ckpt_dir: str) -> list[str]:
    """Problems that make `ckpt_dir` unusable, each naming the file; [] for a complete checkpoint."""
    marker0 = os.path.join(ckpt_dir, MARKER_DIR, "rank_0.json")
    if not os.path.isdir(ckpt_dir):
        return [f"{ckpt_dir}: the checkpoint directory does not exist"]
    markers = _read_marker(marker0)
    if markers is None:
        return [f"{marker0}: missing or unreadable completeness marker (the save did not finish, or the checkpoint "
                "predates markers)"]
    problems = []
    for rank in range(int(markers["world_size"])):
        path = os.path.join(ckpt_dir, MARKER_DIR, f"rank_{rank}.json")
        m = markers if rank == 0 else _read_marker(path)
        if m is None:
            problems.append(f"{path}: missing or unreadable completeness marker of rank {rank}")
            continue
        for rel, size in m["files"].items():
            f = os.path.join(ckpt_dir, rel)
            have = os.path.getsize(f) if os.path.isfile(f) else None
            if have is None:
                problems.append(f"{f}: missing (written by rank {rank})")
            elif have != size:
                problems.append(f"{f}: {have} bytes, {size} written (truncated or overwritten)")
    return problems


def _read_marker(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            m = json.load(f)
        return m if isinstance(m.get("files"), dict) and int(m.get("world_size", 0)) > 0 else None
    except (OSError, ValueError, AttributeError):
        return None


def load_checkpoint(engine, ckpt_dir: str) -> TrainState:
    """Restore weights, optimizer, scheduler and step into `engine`; return the saved data position.

    The checkpoint is verified first: a damaged one fails with the file named, not deep inside torch.load."""
    problems = verify_checkpoint(ckpt_dir)
    if problems:
        raise CorruptCheckpointError(f"checkpoint {ckpt_dir} is incomplete or damaged:\n  " + "\n  ".join(problems))
    _, client = engine.load_checkpoint(os.path.join(ckpt_dir, DS_DIR), tag=DS_TAG, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=True)
    if client is None:
        raise RuntimeError(f"could not load the DeepSpeed checkpoint in {ckpt_dir}/{DS_DIR}")
    return TrainState(**client["train_state"])


def read_train_state(ckpt_dir: str) -> TrainState:
    with open(os.path.join(ckpt_dir, STATE_FILE)) as f:
        return TrainState(**json.load(f))


def is_peft(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def gather_trainable_state_dict(model: torch.nn.Module, rank: int) -> Optional[dict]:
    """Full (unpartitioned) copies of the trainable tensors on rank 0, keyed by parameter name; None elsewhere.

    Under ZeRO-3 a partitioned parameter holds an empty local tensor; `GatheredParameters` all-gathers it for the
    duration of the block (a collective, so every rank enters). Under ZeRO-2 it is a no-op.
    """
    import deepspeed

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out: dict = {}
    chunk: list = []
    numel = 0
    for i, (name, p) in enumerate(named):
        chunk.append((name, p))
        numel += int(getattr(p, "ds_numel", p.numel()))
        if numel >= GATHER_CHUNK_NUMEL or i == len(named) - 1:
            with deepspeed.zero.GatheredParameters([q for _, q in chunk], modifier_rank=None):
                if rank == 0:
                    out.update({n: q.detach().to("cpu", copy=True) for n, q in chunk})
            chunk, numel = [], 0
    return out if rank == 0 else None
