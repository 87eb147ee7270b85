"""The resampler against its definitions: `ResamplerAttention` is `nn.MultiheadAttention` math on the same
parameters (with biases a checkpoint has, not the zeros of a fresh init), the module layout follows the remote
code (heads = embed_dim // 128, no `kv_proj` weight when kv_dim == embed_dim), and a bf16 model stays bf16.

Found by mutation testing (docs/TESTING.md): a dropped query bias, a kv_proj Linear where the checkpoint has none,
a wrong head count and a float32 position table all passed the earlier tests, which used zero biases, one head
and float32 models.

Run: pytest tests/unit/models/test_resampler_layout.py   (~2 s)
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from raytune_minicpmv.models.resampler import Resampler, ResamplerAttention, sincos_2d
from raytune_minicpmv.models.vision import CropRuns

DIM = 256  # two heads of 128


def randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (biases included), as in a trained checkpoint."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def torch_mha(attn: ResamplerAttention) -> nn.MultiheadAttention:
    """The stock module with the same parameters (the same state-dict names)."""
    mha = nn.MultiheadAttention(DIM, attn.num_heads, batch_first=True)
    mha.load_state_dict(attn.state_dict())
    return mha.eval()


def test_resampler_attention_matches_multihead_attention_with_nonzero_biases_and_padding():
    attn = randomised(ResamplerAttention(DIM, 2))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, DIM, generator=g) for n in (5, 7, 7))
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    with torch.no_grad():
        ours = attn(q, k, v, padding)
        ref, _ = torch_mha(attn)(q, k, v, key_padding_mask=padding, need_weights=False)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_packed_resampler_attention_matches_multihead_attention_per_crop():
    attn = randomised(ResamplerAttention(DIM, 2))
    g = torch.Generator().manual_seed(2)
    sizes = torch.tensor([[2, 3], [2, 3], [1, 2]])  # a run of two 6-patch crops, then a 2-patch crop
    q, k, v = torch.randn(5, DIM, generator=g), torch.randn(14, DIM, generator=g), torch.randn(14, DIM, generator=g)
    with torch.no_grad():
        ours = attn(q, k, v, None, runs=CropRuns.from_sizes(sizes))
        mha = torch_mha(attn)
        ref = [mha(q[None], k[s:e][None], v[s:e][None], need_weights=False)[0][0] for s, e in ((0, 6), (6, 12),
                                                                                               (12, 14))]
    assert ours.shape == (3, 5, DIM)
    torch.testing.assert_close(ours, torch.stack(ref), rtol=1e-5, atol=1e-5)


def test_the_query_bias_changes_the_output():
    """A checkpoint's in-projection bias is not zero: the query part of it must reach the attention scores."""
    attn = randomised(ResamplerAttention(DIM, 2))
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, DIM, generator=g), torch.randn(1, 6, DIM, generator=g)
    with torch.no_grad():
        before = attn(q, k, k, None)
        attn.in_proj_bias[:DIM].zero_()  # the query third only
        after = attn(q, k, k, None)
    assert (before - after).abs().max() > 1e-3


@pytest.mark.parametrize("embed_dim, heads", [(128, 1), (256, 2), (3584, 28), (64, 1)])
def test_resampler_heads_are_embed_dim_over_128(embed_dim, heads):
    """The remote code's `embed_dim // 128` (28 heads at Qwen2-7B's 3584), at least one for the tiny models."""
    assert Resampler(num_queries=2, embed_dim=embed_dim, kv_dim=32, max_size=(2, 2)).attn.num_heads == heads


def test_kv_proj_exists_only_when_the_vision_width_differs_from_the_llm_width():
    """The published 2.x checkpoints have `resampler.kv_proj.weight` [D, kv_dim] and no bias; with kv_dim == D
    the remote code uses an identity, so there is no key to load (a Linear there would stay random)."""
    keys = set(Resampler(num_queries=2, embed_dim=DIM, kv_dim=DIM, max_size=(2, 2)).state_dict())
    assert not any(k.startswith("kv_proj") for k in keys)
    projected = Resampler(num_queries=2, embed_dim=DIM, kv_dim=64, max_size=(2, 2)).state_dict()
    assert [k for k in projected if k.startswith("kv_proj")] == ["kv_proj.weight"]
    assert projected["kv_proj.weight"].shape == (DIM, 64)
    x = torch.randn(1, 4, DIM)
    same = randomised(Resampler(num_queries=2, embed_dim=DIM, kv_dim=DIM, max_size=(2, 2)))
    assert torch.equal(same.kv_proj(x), x)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("table", [(4, 4), (2, 2)], ids=["cast-table", "grown-float32-table"])
def test_a_bf16_resampler_runs_in_bf16(packed, table):
    """The sin-cos table is cast to the activations' dtype (a float32 key would meet bf16 weights). `.to(bf16)`
    casts the buffer too, but a table grown for a larger crop is rebuilt in float32."""
    resampler = randomised(Resampler(num_queries=4, embed_dim=DIM, kv_dim=64, max_size=table)).to(torch.bfloat16)
    sizes = torch.tensor([[2, 3], [1, 2]])
    x = torch.randn(8, 64) if packed else torch.randn(2, 6, 64)
    with torch.no_grad():
        out = resampler(x.to(torch.bfloat16), sizes, packed=packed)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, DIM)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("grid", [(3, 2), (2, 3), (3, 3)], ids=["taller", "wider", "both"])
def test_a_crop_larger_than_the_table_grows_it_to_the_same_values(grid):
    """A crop grid beyond `max_size` on either axis rebuilds the sin-cos table at the larger size: the output
    equals that of a resampler built with a table big enough from the start."""
    small = randomised(Resampler(num_queries=3, embed_dim=DIM, kv_dim=64, max_size=(2, 2)))
    big = Resampler(num_queries=3, embed_dim=DIM, kv_dim=64, max_size=(4, 4))
    big.load_state_dict(small.state_dict())
    x = torch.randn(1, grid[0] * grid[1], 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        grown = small(x, torch.tensor([grid]))
        ref = big.eval()(x, torch.tensor([grid]))
    want = (max(grid[0], 2), max(grid[1], 2))
    assert small.max_size == want and tuple(small.pos_embed.shape) == (*want, DIM)
    torch.testing.assert_close(grown, ref, rtol=1e-5, atol=1e-5)


def test_a_crop_within_the_table_keeps_it():
    resampler = randomised(Resampler(num_queries=3, embed_dim=DIM, kv_dim=64, max_size=(3, 3)))
    with torch.no_grad():
        resampler(torch.randn(1, 6, 64), torch.tensor([[3, 2]]))
    assert resampler.max_size == (3, 3) and tuple(resampler.pos_embed.shape) == (3, 3, DIM)


def test_growing_the_table_of_a_meta_built_resampler_puts_it_on_the_cpu():
    """Models built on the meta device (from_pretrained) get a real table: a meta tensor has no values."""
    resampler = Resampler(num_queries=2, embed_dim=DIM, kv_dim=64, max_size=(2, 2)).to("meta")
    assert resampler.pos_embed.device.type == "meta"
    resampler.reset_pos_embed(3, 5)
    assert resampler.pos_embed.device.type == "cpu"
    assert resampler.max_size == (3, 5)
    torch.testing.assert_close(resampler.pos_embed, sincos_2d(DIM, 3, 5), rtol=0, atol=0)


def test_the_three_layer_norms_use_the_remote_codes_eps():
    """The remote code builds them with `partial(nn.LayerNorm, eps=1e-6)`, not torch's default 1e-5: with a
    checkpoint's small activations the two give visibly different features."""
    resampler = Resampler(num_queries=2, embed_dim=DIM, kv_dim=64, max_size=(2, 2))
    assert [m.eps for m in (resampler.ln_q, resampler.ln_kv, resampler.ln_post)] == [1e-6] * 3


def test_the_resampler_attention_initialises_its_own_projection():
    """Built under DeepSpeed's zero.Init, a module is partitioned as its __init__ ends and transformers' weight init
    only reaches empty stubs: what __init__ leaves is what trains. xavier-uniform weight, zero bias, as
    nn.MultiheadAttention (torch.empty left arbitrary memory there: non-finite ZeRO-3 steps now and then)."""
    from raytune_minicpmv.models.resampler import ResamplerAttention

    for _ in range(3):
        attn = ResamplerAttention(64, 4)
        bound = (6.0 / (64 + 3 * 64)) ** 0.5
        w = attn.in_proj_weight.detach()
        assert torch.isfinite(w).all() and w.abs().max() <= bound and w.abs().max() > bound / 2
        assert torch.equal(attn.in_proj_bias.detach(), torch.zeros(3 * 64))
