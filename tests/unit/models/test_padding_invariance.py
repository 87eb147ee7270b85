"""Padding invariance: a crop processed alone gives the same output as the same crop zero-padded in a batch with a
longer one, in the vision tower (every attention implementation that runs on CPU), in the resampler, and through
the whole image path of a loaded checkpoint.

The padded slots are filled with large random values, not zeros: whatever sits there must not reach the crop's
output, and one attended padded patch (or key) moves it far beyond the tolerance. The 2.5 tower, which reproduces
the remote code's unmasked padding, is the check that the set-up sees a leak.

Run: pytest tests/unit/models/test_padding_invariance.py   (~6 s)
"""
from __future__ import annotations

import pytest
import torch
from transformers import Idefics2VisionConfig

from raytune_minicpmv.models import build_tiny, load_model
from raytune_minicpmv.models.resampler import Resampler
from raytune_minicpmv.models.vision import NavitSiglipVisionTower

P = 14
SHORT, LONG = (3, 4), (5, 6)  # patch grids: 12 and 30 patches
CPU_ATTENTION = ["eager", "sdpa"]


def crop(grid, seed):
    return torch.randn(3, P, grid[0] * grid[1] * P, generator=torch.Generator().manual_seed(seed))


def padded_to(x: torch.Tensor, n_patches: int, seed: int) -> torch.Tensor:
    junk = 10 * torch.randn(3, P, n_patches * P - x.shape[-1], generator=torch.Generator().manual_seed(seed))
    return torch.cat([x, junk], dim=-1)


def tower(attn: str, legacy_strip_positions: bool = False) -> NavitSiglipVisionTower:
    config = Idefics2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  patch_size=P, image_size=980)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return NavitSiglipVisionTower(config, legacy_strip_positions).eval()


def alone_and_batched(model, short: torch.Tensor, long: torch.Tensor):
    """(short alone, short padded after the long crop, short padded before it, long alone, long in the batch)."""
    n_long = LONG[0] * LONG[1]
    sizes = torch.tensor([LONG, SHORT], dtype=torch.int32)
    with torch.no_grad():
        alone = model(short[None], torch.tensor([SHORT], dtype=torch.int32))[0]
        second = model(torch.stack([long, padded_to(short, n_long, 1)]), sizes)
        first = model(torch.stack([padded_to(short, n_long, 2), long]), sizes.flip(0))
        long_alone = model(long[None], torch.tensor([LONG], dtype=torch.int32))[0]
    return alone, second[1], first[0], long_alone, second[0]


@pytest.mark.parametrize("attn", CPU_ATTENTION)
def test_vision_tower_output_of_a_crop_does_not_depend_on_padding(attn):
    n_short = SHORT[0] * SHORT[1]
    alone, after, before, long_alone, long_batched = alone_and_batched(tower(attn), crop(SHORT, 0), crop(LONG, 1))
    torch.testing.assert_close(after[:n_short], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(before[:n_short], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(long_batched, long_alone, rtol=1e-5, atol=1e-5)


def test_eager_and_sdpa_towers_agree_on_a_padded_batch():
    outputs = [alone_and_batched(tower(attn), crop(SHORT, 0), crop(LONG, 1))[1] for attn in CPU_ATTENTION]
    torch.testing.assert_close(outputs[0][:12], outputs[1][:12], rtol=1e-5, atol=1e-5)


def test_the_set_up_sees_a_leak_in_the_unmasked_25_tower():
    """MiniCPM-Llama3-V 2.5's tower attends its padded patches (as its remote code does): the output moves."""
    alone, after, *_ = alone_and_batched(tower("sdpa", legacy_strip_positions=True), crop(SHORT, 0), crop(LONG, 1))
    assert (after[:12] - alone).abs().max() > 1e-2


def test_resampler_output_of_a_crop_does_not_depend_on_padded_keys():
    torch.manual_seed(0)
    resampler = Resampler(num_queries=8, embed_dim=128, kv_dim=64)
    torch.nn.init.normal_(resampler.query)
    torch.nn.init.normal_(resampler.attn.in_proj_weight, std=0.1)
    torch.nn.init.zeros_(resampler.attn.in_proj_bias)
    resampler.eval()
    g = torch.Generator().manual_seed(3)
    short, long = torch.randn(12, 64, generator=g), torch.randn(30, 64, generator=g)
    junk = 10 * torch.randn(18, 64, generator=g)
    with torch.no_grad():
        alone = resampler(short[None], torch.tensor([SHORT]))[0]
        batched = resampler(torch.stack([long, torch.cat([short, junk])]), torch.tensor([LONG, SHORT]))
        long_alone = resampler(long[None], torch.tensor([LONG]))[0]
    torch.testing.assert_close(batched[1], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[0], long_alone, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny("minicpmv2_6", tmp_path_factory.mktemp("tiny"), query_num=16)


@pytest.mark.parametrize("attn", CPU_ATTENTION)
def test_image_features_of_a_crop_do_not_depend_on_the_other_crops_of_the_batch(ckpt, attn):
    """The whole image path of a loaded checkpoint (vpm + resampler, `model.attn_implementation`)."""
    model = load_model(ckpt, dtype=torch.float32, attn_implementation=attn).eval()
    assert model.vpm.config._attn_implementation == attn
    short, long = crop(SHORT, 0), crop(LONG, 1)
    with torch.no_grad():
        alone = model.image_features([short], torch.tensor([SHORT]))
        batched = model.image_features([long, short], torch.tensor([LONG, SHORT]))
    torch.testing.assert_close(batched[1], alone[0], rtol=1e-5, atol=1e-5)
