"""Forward semantics of the native model: resampler attention, image placement at image_bound,
vision chunking, the text-only dummy path, out-of-place placement with frozen embeddings, and compute_loss.

Run: pytest tests/unit/models/test_model_forward.py   (seconds)
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raytune_minicpmv.models import build_tiny, compute_loss, load_model
from raytune_minicpmv.models import loss as loss_mod
from raytune_minicpmv.models.resampler import ResamplerAttention

Q = 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny("minicpmv2_6", tmp_path_factory.mktemp("tiny"), query_num=Q, vision_batch_size=16)


def make_batch(with_images=(True, False), length=3 * Q + 20, seed=0) -> dict:
    """Two samples per ARCHITECTURE.md; sample 0 has two crops (3x4 and 5x6 patches) when with_images[0]."""
    g = torch.Generator().manual_seed(seed)
    b = len(with_images)
    ids = torch.randint(0, 1000, (b, length), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -12:] = ids[:, -12:]
    batch = dict(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids),
                 position_ids=torch.arange(length).repeat(b, 1), pixel_values=[], tgt_sizes=[], image_bound=[])
    for has in with_images:
        if has:
            batch["pixel_values"].append([torch.randn(3, 14, 14 * 12, generator=g), torch.randn(3, 14, 14 * 30, generator=g)])
            batch["tgt_sizes"].append(torch.tensor([[3, 4], [5, 6]], dtype=torch.int32))
            batch["image_bound"].append(torch.tensor([[3, 3 + Q], [5 + Q, 5 + 2 * Q]]))
        else:
            batch["pixel_values"].append([])
            batch["tgt_sizes"].append(torch.zeros(0, 2, dtype=torch.int32))
            batch["image_bound"].append(torch.zeros(0, 2, dtype=torch.long))
    return batch


def test_resampler_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(256, 2, batch_first=True)
    ours = ResamplerAttention(256, 2)
    ours.load_state_dict(ref.state_dict())  # same parameter names: in_proj_*, out_proj.*
    q, kv = torch.randn(3, 5, 256), torch.randn(3, 9, 256)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = True
    expected = ref(q, kv + 1, kv, key_padding_mask=pad, need_weights=False)[0]
    torch.testing.assert_close(ours(q, kv + 1, kv, pad), expected, rtol=1e-5, atol=1e-5)


def test_image_features_land_exactly_at_image_bound(ckpt):
    model = load_model(ckpt, dtype=torch.float32).eval()
    batch = make_batch()
    seen = {}
    model.llm.register_forward_pre_hook(lambda m, a, kw: seen.update(emb=kw["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(batch)
        feats = model.image_features(batch["pixel_values"][0], batch["tgt_sizes"][0])
        tokens = model.get_input_embeddings()(batch["input_ids"])
    emb = seen["emb"]
    for crop, (s, e) in enumerate(batch["image_bound"][0].tolist()):
        assert torch.equal(emb[0, s:e], feats[crop])
    outside = torch.ones(emb.shape[1], dtype=torch.bool)
    for s, e in batch["image_bound"][0].tolist():
        outside[s:e] = False
    assert torch.equal(emb[0, outside], tokens[0, outside])
    assert torch.equal(emb[1], tokens[1])  # text-only sample untouched


def test_vision_chunking_does_not_change_results(ckpt):
    model = load_model(ckpt, dtype=torch.float32).eval()
    batch = make_batch((True, True))
    calls = []
    model.vpm.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        full = model(batch).logits
        model.config.vision_batch_size = 1
        chunked = model(batch).logits
    assert len(calls) == 1 + 4  # one call for 4 crops, then one per crop
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)


def test_text_only_training_batch_keeps_vision_in_graph_with_zero_grads(ckpt):
    model = load_model(ckpt, dtype=torch.float32).train()
    batch = make_batch((False, False))
    loss_sum, n = compute_loss(model(batch).logits, batch["labels"])
    (loss_sum / n).backward()
    for name, p in list(model.vpm.named_parameters()) + list(model.resampler.named_parameters()):
        assert p.grad is not None, name  # present (ZeRO/DDP see every vision parameter) ...
        assert torch.count_nonzero(p.grad) == 0, name  # ... and exactly zero
    model.eval()
    calls = []
    model.vpm.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(batch)
    assert calls == []  # no dummy crop outside training


def test_frozen_embeddings_with_input_grads_and_checkpointing(ckpt):
    """The remote code's in-place scatter fails here ("a leaf Variable ... in-place"); ours is out of place."""
    from raytune_minicpmv.models import enable_gradient_checkpointing

    model = load_model(ckpt, dtype=torch.float32).train()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.resampler.parameters():
        p.requires_grad_(True)
    model.enable_input_require_grads()
    enable_gradient_checkpointing(model)
    batch = make_batch()
    loss_sum, n = compute_loss(model(batch).logits, batch["labels"])
    (loss_sum / n).backward()
    assert torch.count_nonzero(model.resampler.query.grad) > 0


def test_bound_and_crop_count_mismatch_is_a_clear_error(ckpt):
    model = load_model(ckpt, dtype=torch.float32).eval()
    batch = make_batch()
    batch["image_bound"][0] = batch["image_bound"][0][:1]
    with pytest.raises(ValueError, match="sample 0: 2 image crops but 1 image_bound"):
        model(batch)
    batch = make_batch()
    batch["image_bound"][0] = torch.tensor([[3, 3 + Q - 1], [5 + Q, 5 + 2 * Q]])
    with pytest.raises(ValueError, match="query_num=16"):
        model(batch)


def test_keyword_call_and_bf16_logits(ckpt):
    model = load_model(ckpt, dtype=torch.bfloat16).eval()
    batch = make_batch()
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.dtype == torch.bfloat16  # logits stay in the model dtype; compute_loss upcasts per chunk
    loss_sum, n = compute_loss(out.logits, batch["labels"])
    assert loss_sum.dtype == torch.float32 and int(n) == 24


def test_compute_loss_equals_shifted_hf_loss_and_chunking_is_exact(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(2, 30, 50, requires_grad=True)
    unshifted = torch.randint(0, 50, (2, 30))
    unshifted[0, :10] = -100
    pre_shifted = torch.cat([unshifted[:, 1:], torch.full((2, 1), -100)], dim=1)  # what the data stage emits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 50), unshifted[:, 1:].reshape(-1), reduction="sum")
    loss_sum, n = compute_loss(logits, pre_shifted)
    torch.testing.assert_close(loss_sum, expected)
    assert int(n) == int((unshifted[:, 1:] != -100).sum())
    (grad_full,) = torch.autograd.grad(loss_sum, logits)
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 7 * 50)  # 7 rows per chunk, checkpointed
    chunked, _ = compute_loss(logits, pre_shifted)
    (grad_chunked,) = torch.autograd.grad(chunked, logits)
    torch.testing.assert_close(chunked, expected)
    torch.testing.assert_close(grad_chunked, grad_full)


def test_25_family_builds_loads_and_trains(tmp_path):
    ckpt25 = build_tiny("minicpmv2_5", tmp_path, query_num=Q)
    model = load_model(ckpt25, dtype=torch.float32).train()
    assert type(model.llm).__name__ == "LlamaForCausalLM" and model.config.use_image_id is False
    assert not any(k.startswith("llm.") and k.endswith("q_proj.bias") for k in model.state_dict())  # Llama: no bias
    batch = make_batch()
    loss_sum, n = compute_loss(model(batch).logits, batch["labels"])
    (loss_sum / n).backward()
    assert torch.isfinite(loss_sum) and torch.count_nonzero(model.resampler.query.grad) > 0
