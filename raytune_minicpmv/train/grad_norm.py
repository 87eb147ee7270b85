"""The gradient 2-norm of the last optimizer step, for the progress line and metrics, whatever the engine.

DeepSpeed keeps it (`engine.get_global_grad_norm()`) on its ZeRO and bf16/fp16 paths; its plain path (no ZeRO, fp32:
the CPU / laptop default) clips with its own clip_grad_norm_ and drops the norm, so the log printed `grad_norm nan`.
`keep_plain_grad_norm` (called by `worker.train_step` before `engine.step()`) fills that one gap.
"""
from __future__ import annotations

from typing import Optional

import torch


def _keeps_grad_norm(engine) -> bool:
    # DeepSpeed's plain path (no ZeRO, fp32) clips with its own clip_grad_norm_ and drops the norm it computed
    return engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled()


def keep_plain_grad_norm(engine) -> None:
    """On the plain path, the norm of this step's gradients (before clipping), kept on the device (no host sync)."""
    if _keeps_grad_norm(engine) or not engine.is_gradient_accumulation_boundary():
        return
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    # (torch.nn.utils.get_total_norm is torch >= 2.6; the package's floor is 2.4)
    engine.plain_grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) \
        if grads else None


def grad_norm(engine) -> Optional[float]:
    """The last optimizer step's gradient 2-norm (before clipping), whatever the ZeRO stage and dtype."""
    norm = engine.get_global_grad_norm()
    if norm is None and not _keeps_grad_norm(engine):
        norm = getattr(engine, "plain_grad_norm", None)
    return None if norm is None else float(norm)
