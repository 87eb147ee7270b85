"""Golden numbers: the first 4 losses of 4 SGD steps of the tiny 2.6 model on the sample dataset, through the real
data stage (records → rows → collate). Catches label-shift, masking and image-placement bugs that shape tests miss.

How the numbers were obtained: this exact code was run once (torch 2.13.0 CPU, transformers 5.24.0) and its output
pasted below. Sanity anchors: the first loss is close to ln(vocab 1563) = 7.35 (random init predicts uniformly),
and the following ones go down. A tolerance of 1e-3 absorbs BLAS/thread-count noise only; a label shift or a
misplaced image changes them by far more.
Run: pytest tests/unit/models/test_model_golden.py   (~20 s on 2 cores)
"""
from __future__ import annotations

import math

import pytest
import torch

from raytune_minicpmv.config import LoraConfig, TrainableConfig
from raytune_minicpmv.models import apply_trainable_policy, build_tiny, compute_loss, load_model
from raytune_minicpmv.data.records import read_raw_records
from raytune_minicpmv.data.rows import collate_rows, preprocess_records, rows_to_table, table_to_numpy
from raytune_minicpmv.data.sample_data import write_sample_dataset
from raytune_minicpmv.data.templates import TokenizerInfo, model_spec_from_config

GOLDEN_LOSSES = [7.417376, 6.707579, 5.583538, 4.646075]


def test_first_four_sgd_losses_on_sample_data(tmp_path):
    ckpt = build_tiny("minicpmv2_6", tmp_path / "ckpt", query_num=16, seed=0)
    spec = model_spec_from_config(ckpt, "qwen2")
    raws = list(read_raw_records(write_sample_dataset(tmp_path / "data")))
    table = rows_to_table(preprocess_records(raws, spec, TokenizerInfo.load(ckpt), 2048, "error"), spec.patch_size)
    torch.manual_seed(0)
    model = apply_trainable_policy(load_model(ckpt, dtype=torch.float32),
                                   TrainableConfig(vision="full", resampler="full", llm="full", embed_tokens="full"),
                                   LoraConfig())
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    losses, crops = [], 0
    for step in range(4):
        batch = collate_rows(table_to_numpy(table.slice(4 * step, 4)))
        crops += sum(len(p) for p in batch["pixel_values"])
        loss_sum, n_tokens = compute_loss(model(batch).logits, batch["labels"])
        loss = loss_sum / n_tokens
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert crops > 0  # images really go through the model
    assert abs(losses[0] - math.log(1563)) < 0.2
    assert losses == [pytest.approx(g, abs=1e-3) for g in GOLDEN_LOSSES]
