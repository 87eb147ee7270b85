"""Packed ≡ unpacked: the same samples trained as packed rows (data.packing) give the same loss and the same
gradients as trained one sample per micro-batch, with the worker's global-token normalization, in fp32.

Real rows: the sample dataset (multi-image, sliced, multi-turn and text-only records) preprocessed for a tiny 2.6
checkpoint; several samples per packed row, rows with different label counts; the attention mask is
transformers' own packed-sequence mask (positions restart per sample), through SDPA and eager.
The control: the same packed rows with positions NOT restarting must give a different loss (attention then
crosses samples), so the comparison can see a leak.

Run: pytest tests/unit/models/test_packed_equivalence.py   (~10 s)
"""
from __future__ import annotations

import pytest
import torch

from raytune_minicpmv.data.packing import collate_packed, first_fit_decreasing
from raytune_minicpmv.data.records import read_raw_records
from raytune_minicpmv.data.rows import collate_rows, preprocess_records, rows_to_table, table_to_numpy
from raytune_minicpmv.data.sample_data import write_sample_dataset
from raytune_minicpmv.data.templates import TokenizerInfo, model_spec_from_config
from raytune_minicpmv.models import build_tiny, compute_loss, load_model

SAMPLES = [0, 1, 2, 3, 4, 5, 6]  # includes multi-image (2), sliced multi-turn (3) and text-only (4) records


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("packeq")
    ckpt = build_tiny("minicpmv2_6", root / "model", query_num=16)
    spec = model_spec_from_config(ckpt, "qwen2", max_slice_nums=2)  # a few crops per image: seconds on CPU
    raws = list(read_raw_records(write_sample_dataset(root / "data")))
    rows = preprocess_records([raws[i] for i in SAMPLES], spec, TokenizerInfo.load(ckpt), 2048)
    return ckpt, table_to_numpy(rows_to_table(rows, spec.patch_size))


def take(cols: dict, idx) -> dict:
    return {k: v[list(idx)] for k, v in cols.items()}


def step(model, batches) -> tuple[float, dict]:
    """The worker's arithmetic: every micro-batch's loss sum / the step's label count, gradients accumulated."""
    model.zero_grad(set_to_none=True)
    total_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    loss = 0.0
    for b in batches:
        loss_sum, _ = compute_loss(model(b).logits, b["labels"])
        (loss_sum / total_tokens).backward()
        loss += float(loss_sum.detach()) / total_tokens
    return loss, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def packed_rows(cols: dict, budget: int) -> list[dict]:
    return [collate_packed(take(cols, g)) for g in first_fit_decreasing([len(x) for x in cols["input_ids"]], budget)]


@pytest.mark.parametrize("attn", ["sdpa"])  # the CPU path; eager builds the same mask
def test_packed_rows_give_the_same_loss_and_gradients_as_one_sample_per_micro_batch(setup, attn):
    ckpt, cols = setup
    model = load_model(ckpt, dtype=torch.float32, attn_implementation=attn).train()
    lengths = [len(x) for x in cols["input_ids"]]
    budget = int(sum(lengths) * 0.6)  # two or three rows of several samples
    packed = packed_rows(cols, budget)
    assert len(packed) >= 2 and max(len(b["seq_lens"]) for b in packed) >= 3
    assert len({int((b["labels"] != -100).sum()) for b in packed}) == len(packed)  # different label counts
    assert sum(len(p) for b in packed for p in b["pixel_values"]) >= 5  # images ride along

    ref_loss, ref_grads = step(model, [collate_rows(take(cols, [i])) for i in range(len(lengths))])
    loss, grads = step(model, packed)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and any(n.startswith("vpm.") for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_positions_that_do_not_restart_let_attention_cross_samples(setup):
    """The control: one row, positions 0..L-1 (no restart) — causal attention then reads the previous samples."""
    ckpt, cols = setup
    model = load_model(ckpt, dtype=torch.float32).eval()
    row = packed_rows(cols, 10**6)[0]
    assert len(row["seq_lens"]) == len(SAMPLES)
    with torch.no_grad():
        restarted, _ = compute_loss(model(row).logits, row["labels"])
        flat = {**row, "position_ids": torch.arange(row["input_ids"].shape[1])[None]}
        crossing, _ = compute_loss(model(flat).logits, flat["labels"])
        singles = [collate_rows(take(cols, [i])) for i in range(len(SAMPLES))]
        ref = sum(float(compute_loss(model(b).logits, b["labels"])[0]) for b in singles)
    assert float(restarted) == pytest.approx(ref, rel=1e-5)
    assert abs(float(crossing) - ref) > 1e-3 * abs(ref)
