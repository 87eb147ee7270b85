"""Sum-reduced cross-entropy over pre-shifted labels.

    loss_sum, n_tokens = compute_loss(model(batch).logits, batch["labels"])
    (loss_sum / global_n_tokens).backward()   # the training loop owns the normalization (docs/MODELS.md)

`labels[b, t]` is already the target of position t (the data stage shifted them), so there is NO shift here:
positions with label -100 are ignored. The CE runs in float32 over chunks of rows; each chunk is recomputed in the
backward pass (activation checkpointing), so the float32 copy of `[rows, vocab]` exists for one chunk at a time
instead of for the whole sequence (for a 152k vocabulary that is 0.6 GB per 1k tokens).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 26  # logits elements per float32 chunk (256 MiB)


def _chunk_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    keep = labels != IGNORE_INDEX
    return F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")


def compute_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 sum of CE over labels != -100, number of those tokens as a long tensor)."""
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1).to(flat_logits.device).long()
    n_tokens = (flat_labels != IGNORE_INDEX).sum()
    rows = max(1, CHUNK_ELEMENTS // vocab)
    total = flat_logits.new_zeros((), dtype=torch.float32)
    for s in range(0, flat_labels.numel(), rows):
        lab = flat_labels[s:s + rows]
        if not bool((lab != IGNORE_INDEX).any()):
            continue
        lg = flat_logits[s:s + rows]
        if lg.requires_grad:
            total = total + checkpoint(_chunk_ce, lg, lab, use_reentrant=False)
        else:
            total = total + _chunk_ce(lg, lab)
    return total, n_tokens
