"""compute_loss edge cases the golden and HF-equivalence tests do not reach (found by mutation testing,
docs/TESTING.md): the no-grad (evaluation) path, a target at the very first position, a chunk with no targets
between chunks with targets, and a micro-batch without any target.

    .venv/bin/python -m pytest tests/unit/models/test_loss_sum.py -q
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raytune_minicpmv.models import loss as loss_mod
from raytune_minicpmv.models.loss import IGNORE_INDEX, compute_loss

VOCAB = 11


def _case():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 12, VOCAB, generator=g)
    labels = torch.randint(0, VOCAB, (2, 12), generator=g)
    labels[0, 4:12] = IGNORE_INDEX  # rows 4..11 of the flat sequence: a whole 4-row chunk without targets
    labels[1, 5] = IGNORE_INDEX
    assert labels[0, 0] != IGNORE_INDEX  # the very first position is a target
    keep = labels.reshape(-1) != IGNORE_INDEX
    expected = F.cross_entropy(logits.reshape(-1, VOCAB)[keep], labels.reshape(-1)[keep], reduction="sum")
    return logits, labels, expected, int(keep.sum())


@pytest.mark.parametrize("rows_per_chunk", [4, 24, 1000])
@pytest.mark.parametrize("grad", [False, True], ids=["eval_no_grad", "train_checkpointed"])
def test_sum_over_every_target_in_every_chunk(monkeypatch, rows_per_chunk, grad):
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", rows_per_chunk * VOCAB)
    logits, labels, expected, n = _case()
    logits.requires_grad_(grad)
    total, count = compute_loss(logits, labels)
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-6)
    assert int(count) == n and total.dtype == torch.float32 and total.requires_grad == grad


def test_each_target_counts_once_including_the_first_position():
    logits, labels, _, _ = _case()
    only_first = torch.full_like(labels, IGNORE_INDEX)
    only_first[0, 0] = labels[0, 0]
    total, count = compute_loss(logits, only_first)
    assert int(count) == 1
    torch.testing.assert_close(total, F.cross_entropy(logits[0, :1], labels[0, :1], reduction="sum"))


def test_a_micro_batch_without_targets_gives_a_float32_zero():
    """Its zero is summed with other micro-batches' float32 sums and all-reduced: it must not be a bf16 tensor."""
    logits = torch.randn(1, 5, VOCAB).to(torch.bfloat16)
    total, count = compute_loss(logits, torch.full((1, 5), IGNORE_INDEX))
    assert total.dtype == torch.float32 and float(total) == 0.0 and int(count) == 0
