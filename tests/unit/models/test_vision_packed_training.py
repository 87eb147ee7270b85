"""The packed vision path in training: it applies the tower's attention dropout (and only in training), and it
checkpoints a layer with the layer's own checkpoint function (the one transformers' gradient_checkpointing_enable
or DeepSpeed set, with the user's kwargs), not a fixed one.

The published SigLIP configs have `attention_dropout: 0.0`, so every other test ran with no dropout at all and
mutation testing (docs/TESTING.md) found that a packed layer ignoring it went unnoticed; a user config with
dropout > 0 would have trained without it on the packed (varlen) path only.

Run: pytest tests/unit/models/test_vision_packed_training.py   (~2 s)
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from transformers import Idefics2VisionConfig

from raytune_minicpmv.models.vision import NavitSiglipVisionTower

P = 14
GRIDS = [(3, 4), (2, 6), (1, 3)]


def tower(dropout: float) -> NavitSiglipVisionTower:
    config = Idefics2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                  patch_size=P, image_size=980, attention_dropout=dropout)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return NavitSiglipVisionTower(config)


def packed_output(model: NavitSiglipVisionTower, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    pixels = torch.cat([torch.randn(3, P, h * w * P, generator=g) for h, w in GRIDS], dim=-1)[None]
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(pixels, torch.tensor(GRIDS, dtype=torch.int32), packed=True)


def test_packed_attention_dropout_acts_in_training_only():
    model = tower(dropout=0.5)
    reference = packed_output(model.eval(), seed=0)
    assert torch.equal(packed_output(model, seed=1), reference)  # eval: deterministic, no dropout
    model.train()
    first, second = packed_output(model, seed=1), packed_output(model, seed=2)
    assert (first - reference).abs().max() > 1e-2  # dropout changed the attention
    assert (first - second).abs().max() > 1e-2  # and draws a new mask each call
    assert torch.equal(packed_output(model, seed=1), first)  # from torch's RNG


def test_without_dropout_training_and_eval_agree():
    model = tower(dropout=0.0)
    torch.testing.assert_close(packed_output(model.train(), 1), packed_output(model.eval(), 0), rtol=0, atol=0)


def test_a_checkpointed_packed_layer_uses_the_layers_own_checkpoint_function():
    model = tower(dropout=0.0).train()
    layer = model.encoder.layers[0]
    calls = []

    def recording_checkpoint(fn, *args):
        calls.append(len(args))
        return checkpoint(fn, *args, use_reentrant=False)

    layer.gradient_checkpointing, layer._gradient_checkpointing_func = True, recording_checkpoint
    g = torch.Generator().manual_seed(1)
    pixels = torch.cat([torch.randn(3, P, h * w * P, generator=g) for h, w in GRIDS], dim=-1)[None]
    model(pixels, torch.tensor(GRIDS, dtype=torch.int32), packed=True).sum().backward()
    assert calls == [2]  # the hidden states and the PackedCrops, positionally (transformers' layer call)
    with torch.no_grad():  # no graph, nothing to recompute: not checkpointed
        model(pixels, torch.tensor(GRIDS, dtype=torch.int32), packed=True)
    assert calls == [2]


def test_the_25_tower_refusal_says_why():
    config = Idefics2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                  patch_size=P, image_size=980)
    legacy = NavitSiglipVisionTower(config, legacy_strip_positions=True)
    with pytest.raises(ValueError, match=r"2\.5 tower: its crops attend their padding \(remote-code behaviour\), "
                                         r"so padding changes its output$"):
        legacy(torch.zeros(1, 3, P, 2 * P), torch.tensor([[1, 2]]), packed=True)
