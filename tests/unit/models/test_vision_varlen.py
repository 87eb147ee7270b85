"""Packed ("varlen") vision: crops back to back without padding give the same features as the padded, masked
path and as one call per crop, in the tower, the resampler and the model's image path; gradients too.

The crop set mixes lengths and grids of equal length but different shape (3x4, 4x3, 2x6: 12 patches each, so
the position ids and the resampler's 2-D position table differ inside one SDPA run), given in an unsorted order.
The control test merges all crops into one run: attention across crop boundaries must move the output far
beyond the tolerance, so the equality checks above can see a leak.

Run: pytest tests/unit/models/test_vision_varlen.py   (~10 s)
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import Idefics2VisionConfig

from raytune_minicpmv.models import build_tiny, load_model
from raytune_minicpmv.models.resampler import Resampler
from raytune_minicpmv.models.vision import CropRuns, NavitSiglipVisionTower, PackedCrops

P = 14
GRIDS = [(3, 4), (5, 6), (4, 3), (2, 6), (5, 6), (1, 1), (6, 5)]


def crops(grids=GRIDS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, P, h * w * P, generator=g) for h, w in grids]


def sizes(grids=GRIDS):
    return torch.tensor(grids, dtype=torch.int32)


def tower(attn="sdpa", layers=2, legacy=False) -> NavitSiglipVisionTower:
    config = Idefics2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                  num_attention_heads=4, patch_size=P, image_size=980)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return NavitSiglipVisionTower(config, legacy_strip_positions=legacy)


def checkpoint_layer(layer):
    """What transformers' gradient_checkpointing_enable(use_reentrant=False) sets on each layer."""
    layer.gradient_checkpointing = True
    layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)


def assert_grads_close(got: dict, want: dict, min_count: int) -> None:
    """Same parameter set; each gradient equal to fp32 summation-order noise relative to its own scale."""
    assert got.keys() == want.keys() and len(want) >= min_count
    for name, g in want.items():
        err, scale = (got[name] - g).abs().max().item(), g.abs().max().item()
        assert err <= 1e-5 * scale + 1e-6, f"{name}: max |diff| {err:.3g} vs max |grad| {scale:.3g}"


def padded(xs):
    width = max(x.shape[-1] for x in xs)
    return torch.stack([F.pad(x, (0, width - x.shape[-1])) for x in xs])


def unpad(out, grids=GRIDS):
    return torch.cat([out[i, : h * w] for i, (h, w) in enumerate(grids)])


def test_crop_runs_group_consecutive_equal_lengths():
    runs = CropRuns.from_sizes(torch.tensor([[5, 6], [6, 5], [3, 4], [4, 3], [2, 6], [1, 1], [5, 6]]))
    assert runs.runs == ((0, 2, 30), (60, 3, 12), (96, 1, 1), (97, 1, 30))
    assert runs.total == 127


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_tower_equals_padded_and_per_crop_calls(attn):
    model, xs = tower(attn).eval(), crops()
    with torch.no_grad():
        packed = model(torch.cat(xs, dim=-1)[None], sizes(), packed=True)
        pad = unpad(model(padded(xs), sizes()))
        alone = torch.cat([model(x[None], sizes([g]))[0] for x, g in zip(xs, GRIDS)])
    assert packed.shape == (sum(h * w for h, w in GRIDS), 64)
    torch.testing.assert_close(packed, pad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_attention_across_crops_is_seen_by_the_comparison():
    """Control: the same packed layers with ONE run over all crops (crops attend each other) differ clearly."""
    model, xs = tower().eval(), crops()
    with torch.no_grad():
        good = model(torch.cat(xs, dim=-1)[None], sizes(), packed=True)
        t = sum(h * w for h, w in GRIDS)
        pos = torch.cat([model(x[None], sizes([g]), packed=False)[0] for x, g in zip(xs, GRIDS)])  # per-crop
        from raytune_minicpmv.models.vision import packed_position_ids
        h = model.embeddings(torch.cat(xs, dim=-1)[None], packed_position_ids(sizes(), 70)[None])[0]
        for layer in model.encoder.layers:
            h = layer(h, PackedCrops(CropRuns(((0, 1, t),))))
        leaky = model.post_layernorm(h)
    torch.testing.assert_close(good, pos, rtol=1e-5, atol=1e-5)
    assert (leaky - good).abs().max() > 1e-2


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_tower_gradients_equal_the_padded_path(checkpointing):
    xs = crops()
    weights = torch.randn(sum(h * w for h, w in GRIDS), 64, generator=torch.Generator().manual_seed(3))
    grads = []
    for packed in (False, True):
        model = tower(layers=2).train()
        if checkpointing:
            for layer in model.encoder.layers:
                checkpoint_layer(layer)
        if packed:
            out = model(torch.cat(xs, dim=-1)[None], sizes(), packed=True)
        else:
            out = unpad(model(padded(xs), sizes()))
        (out * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert_grads_close(grads[1], grads[0], min_count=30)


def test_checkpointed_packed_layers_recompute_in_backward():
    """With gradient checkpointing the packed layer runs again in the backward (its activations were dropped)."""
    model = tower(layers=1).train()
    checkpoint_layer(model.encoder.layers[0])
    calls = []
    model.encoder.layers[0].layer_norm1.register_forward_pre_hook(lambda *a: calls.append(1))
    xs = crops()
    model(torch.cat(xs, dim=-1)[None], sizes(), packed=True).sum().backward()
    assert len(calls) == 2


def test_the_25_tower_refuses_packed_input():
    with pytest.raises(ValueError, match="2.5 tower"):
        tower(legacy=True)(torch.cat(crops(), dim=-1)[None], sizes(), packed=True)


def test_packed_tower_rejects_pixels_that_do_not_match_tgt_sizes():
    with pytest.raises(ValueError, match="packed pixels"):
        tower()(torch.cat(crops()[:2], dim=-1)[None], sizes(), packed=True)


def test_packed_resampler_equals_padded_and_per_crop_calls():
    torch.manual_seed(0)
    res = Resampler(num_queries=8, embed_dim=128, kv_dim=64)
    torch.nn.init.normal_(res.query)
    torch.nn.init.normal_(res.attn.in_proj_weight, std=0.1)
    torch.nn.init.normal_(res.attn.in_proj_bias, std=0.1)
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(h * w, 64, generator=g) for h, w in GRIDS]
    n_max = max(f.shape[0] for f in feats)
    with torch.no_grad():
        packed = res(torch.cat(feats), sizes(), packed=True)
        pad = res(torch.stack([F.pad(f, (0, 0, 0, n_max - f.shape[0])) for f in feats]), sizes())
        alone = torch.cat([res(f[None], sizes([grid])) for f, grid in zip(feats, GRIDS)])
    assert packed.shape == (len(GRIDS), 8, 128)
    torch.testing.assert_close(packed, pad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny("minicpmv2_6", tmp_path_factory.mktemp("tiny"), query_num=16, vision_batch_size=3)


@pytest.mark.parametrize("packed_chunk", [None, 3])
def test_model_image_features_and_gradients_equal_with_varlen(ckpt, packed_chunk):
    """The model's image path (sort, pack all crops in one call or in chunks of model.vision_chunk_crops=3, restore
    order) vs padded (chunks of the checkpoint's vision_batch_size=3)."""
    xs, ts = crops(), sizes()
    results = []
    for varlen in (False, True):
        model = load_model(ckpt, dtype=torch.float32).train()
        model.vision_varlen = varlen
        if varlen:
            model.vision_chunk = packed_chunk
        feats = model.image_features(xs, ts)
        weights = torch.randn(feats.shape, generator=torch.Generator().manual_seed(5))
        (feats * weights).sum().backward()
        results.append((feats.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                         if p.grad is not None and (n.startswith("vpm") or n.startswith("resampler"))}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    assert_grads_close(results[1][1], results[0][1], min_count=40)


@pytest.mark.parametrize("varlen, chunk, calls", [(True, None, 1), (True, 3, 3), (False, None, 3)])
def test_packed_crops_go_through_the_tower_in_one_call(ckpt, varlen, chunk, calls):
    """Packed crops run in one vision-tower call per batch (chunks of vision_batch_size only multiplied the tower's
    kernel launches); model.vision_chunk_crops still chunks them; padded crops keep the checkpoint's
    vision_batch_size (3 here: 7 crops, 3 calls)."""
    model = load_model(ckpt, dtype=torch.float32).train()
    model.vision_varlen, model.vision_chunk = varlen, chunk
    seen = []
    model.vpm.register_forward_hook(lambda *a: seen.append(1))
    model.image_features(crops(), sizes())
    assert len(seen) == calls


def test_vision_chunk_crops_reaches_the_model(ckpt):
    from raytune_minicpmv.config import load_config
    from raytune_minicpmv.models.kernels import configure_kernels

    model = load_model(ckpt, dtype=torch.float32)
    cfg = load_config(None, ["model.vision_chunk_crops=5"], check_paths=False)
    configure_kernels(model, cfg.model, use_gpu=False)
    assert model.vision_chunk == 5 and model._vision_chunk(7) == 5


def test_model_gradient_checkpointing_applies_to_the_packed_vision_layers(ckpt):
    """`enable_gradient_checkpointing(model, "vision")` (what the worker calls) reaches the packed layers: each
    runs once in forward and once more in backward."""
    from raytune_minicpmv.models import enable_gradient_checkpointing

    model = load_model(ckpt, dtype=torch.float32).train()
    model.vision_varlen = True
    enable_gradient_checkpointing(model, mode="vision")
    calls = []
    for layer in model.vpm.encoder.layers:
        layer.layer_norm1.register_forward_pre_hook(lambda *a: calls.append(1))
    model.config.vision_batch_size = 100
    model.image_features(crops(), sizes()).sum().backward()
    assert len(calls) == 2 * len(model.vpm.encoder.layers)


def test_checkpointed_packed_layers_train_behind_frozen_embeddings(ckpt):
    """With frozen patch and position embeddings (LoRA on the encoder only) the first layer's input needs no grad;
    the worker's checkpointing (non-reentrant) still gives every packed layer's weights a gradient, where reentrant
    checkpointing would give them none."""
    from raytune_minicpmv.models import enable_gradient_checkpointing

    model = load_model(ckpt, dtype=torch.float32).train()
    model.vision_varlen = True
    model.vpm.embeddings.requires_grad_(False)
    enable_gradient_checkpointing(model, mode="vision")
    model.config.vision_batch_size = 100
    model.image_features(crops(), sizes()).sum().backward()
    for layer in model.vpm.encoder.layers:
        grad = layer.self_attn.q_proj.weight.grad
        assert grad is not None and torch.count_nonzero(grad) > 0


def test_the_grouped_attention_backward_writes_each_gradient_once():
    """The runs are split, not sliced: a slice's backward writes a zero tensor of the whole packed sequence per run
    (then the engine adds them up), so q, k and v each cost runs x 3 full-size passes of memory traffic on the GPU
    (the recipe's profile: ~80 ms a step of strided copies). A split's backward is one concatenation."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from raytune_minicpmv.models.vision import grouped_attention

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    runs = CropRuns.from_sizes(sizes())
    assert len(runs.runs) == 6  # the two 12-patch grids in a row share a run
    q, k, v = (torch.randn(runs.total, 4, 16, requires_grad=True) for _ in range(3))
    out = grouped_attention(q, k, v, runs, scale=0.25)
    with Ops() as ops:
        out.square().sum().backward()
    assert "slice_backward" not in ops.names and "zeros" not in ops.names, sorted(set(ops.names))
    # and the same result as one attention call per crop
    ref, start = [], 0
    for h, w in GRIDS:
        n = h * w
        qc, kc, vc = (x[start:start + n].detach().transpose(0, 1) for x in (q, k, v))
        ref.append(F.scaled_dot_product_attention(qc, kc, vc, scale=0.25).transpose(0, 1).reshape(n, 64))
        start += n
    torch.testing.assert_close(out, torch.cat(ref))


@pytest.mark.parametrize("packed", [False, True])
def test_the_residual_stream_is_contiguous_in_both_passes(packed):
    """The patch embedding's `[B, C, N]` output is transposed to `[B, N, C]`; kept as a view, every residual add after
    it inherited that channel-major layout, so each layer norm copied its input (and its gradient) and the backward
    summed gradients of mixed layouts: ~2 strided copies per vision layer (the recipe's GPU profile: ≈ 75 ms a step
    of the 634 ms of kernels). Every layer's input and the gradient at its output must be plain row-major."""
    model, xs = tower(layers=2).train(), crops()
    seen = []
    for layer in model.encoder.layers:
        layer.register_forward_pre_hook(lambda m, args: seen.append(("input", args[0].is_contiguous())))
        layer.register_full_backward_hook(lambda m, gin, gout: seen.append(("grad", gout[0].is_contiguous())))
    out = model(torch.cat(xs, dim=-1)[None], sizes(), packed=True) if packed else model(padded(xs), sizes())
    out.square().sum().backward()
    assert len(seen) == 4 and all(ok for _, ok in seen), seen
