"""Sum-reduced cross-entropy over pre-shifted labels.

    loss_sum, n_tokens = compute_loss(model(batch).logits, batch["labels"])
    (loss_sum / global_n_tokens).backward()   # the training loop owns the normalization (docs/MODELS.md)

`labels[b, t]` is already the target of position t (the data stage shifted them), so there is NO shift here:
positions with label -100 are ignored. The CE runs in float32 over chunks of rows; each chunk is recomputed in the
backward pass (activation checkpointing), so the float32 copy of `[rows, vocab]` exists for one chunk at a time
instead of for the whole sequence (for a 152k vocabulary that is 0.6 GB per 1k tokens).

Fused linear + CE (`linear_cross_entropy`, `model.fused_ce`): the loss from the LLM's final hidden states and its
`lm_head`, so the `[tokens, vocab]` logits never exist, not even in bf16: only the rows with a label go through
the head, in chunks of `CHUNK_ELEMENTS // vocab` rows, each chunk's logits recomputed in the backward pass. Same
sum and count as `compute_loss(lm_head(hidden), labels)` (the same per-row math; tests/unit/models/test_fused_ce.py).

    loss_sum, n_tokens = batch_loss(model, batch, fused=True)    # model(batch, loss_only=True) underneath
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .transfer import host_to_device

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


def _chunk_linear_ce(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices of the labelled tokens (labels != -100), a long tensor on the labels' device."""
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def with_label_positions(batch: dict) -> dict:
    """The batch plus `label_positions` (flat indices of its labelled tokens), computed where the labels are: on
    the host, before the batch moves to the GPU, the fused loss then needs no device→host sync to find them."""
    return {**batch, "label_positions": labelled_positions(batch["labels"])}


def labelled_rows(hidden: torch.Tensor, labels: torch.Tensor,
                  label_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused losses' inputs: (hidden rows `[n, d]` and labels `[n]` of the n labelled tokens, n as a long
    tensor on their device). `label_positions` (`labelled_positions(labels)`, e.g. from the host) skips finding
    them."""
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_l = labels.reshape(-1).to(flat_h.device).long()
    keep = labelled_positions(flat_l) if label_positions is None else label_positions.to(flat_h.device)
    n_tokens = host_to_device(torch.tensor(keep.numel()), flat_h.device)  # a torch.tensor(device=cuda) syncs
    return flat_h.index_select(0, keep), flat_l.index_select(0, keep), n_tokens


def linear_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, vocab: int,
                         single_call: bool = False,
                         label_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`compute_loss(head(hidden), labels)` without the logits of the whole sequence.

    hidden `[..., d]`, labels `[...]` (pre-shifted, -100 ignored), `head` the output projection MODULE (called,
    so PEFT wrappers and ZeRO-3 gathers apply). `single_call=True` (ZeRO-3: every call of `head` is a collective,
    so each rank makes exactly one, also with no target) runs the labelled rows through `head` at once and chunks
    only the float32 CE. `label_positions` (`labelled_positions(labels)`, e.g. from the host) skips finding them.
    """
    rows_h, rows_l, n_tokens = labelled_rows(hidden, labels, label_positions)
    if single_call:
        logits = head(rows_h)
        total, _ = compute_loss(logits, rows_l)
        return total + logits.sum() * 0.0, n_tokens  # keeps lm_head in the graph on a rank without targets
    grads = torch.is_grad_enabled() and (rows_h.requires_grad or any(p.requires_grad for p in head.parameters()))
    rows = max(1, CHUNK_ELEMENTS // vocab)
    total = rows_h.new_zeros((), dtype=torch.float32)
    for s in range(0, rows_l.numel(), rows):
        h, lab = rows_h[s:s + rows], rows_l[s:s + rows]
        if grads:
            total = total + checkpoint(_chunk_linear_ce, h, lab, head, use_reentrant=False)
        else:
            total = total + _chunk_linear_ce(h, lab, head)
    return total, n_tokens


def batch_loss(model, batch: dict, fused: bool, family: str = "minicpmv2_6",
               downsample_mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, label-token count) of one micro-batch: from the model's hidden states (`fused`, our 2.x models:
    `model(batch, loss_only=True)`) or from its logits (`compute_loss` over `forward.forward_logits`, which calls
    each family the way it takes its batch)."""
    if fused:
        out = model(batch, loss_only=True)
        return out.loss_sum, out.n_tokens
    from .forward import forward_logits

    return compute_loss(forward_logits(model, batch, family, downsample_mode), batch["labels"])
