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
    if rank != 0:
        return
    if is_peft(model):
        from .lora_adapter import save_adapter

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


def load_checkpoint(engine, ckpt_dir: str) -> TrainState:
    """Restore weights, optimizer, scheduler and step into `engine`; return the saved data position."""
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
