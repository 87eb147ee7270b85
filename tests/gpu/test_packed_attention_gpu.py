"""Packed rows on the GPU: every `model.packed_attention` backend (sdpa block mask, FlexAttention document mask,
varlen_attn with the K/V heads repeated) against the exact path — each sample alone, unpacked, fp32 SDPA — for
the Qwen2 (2.6) and Llama3 (2.5) LLMs with grouped-query attention, logits and gradients.

    python -m pytest -m gpu tests/gpu/test_packed_attention_gpu.py -q

bf16 rounding differs by kernel, so each backend's error is bounded by a few times the error of the same samples
run unpacked in bf16 (the noise floor); attention that crossed a sample boundary is off by O(1) relative.
"""
from __future__ import annotations

import pytest
import torch

from raytune_minicpmv.models import build_tiny, compute_loss, load_model
from raytune_minicpmv.models.packing import use_packed_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
LENGTHS = [37, 200, 64, 129, 90, 1]  # a one-token sample too
DEV = "cuda"


@pytest.fixture(scope="module", params=["minicpmv2_6", "minicpmv2_5"])
def ckpt(request, tmp_path_factory):
    return build_tiny(request.param, tmp_path_factory.mktemp(request.param), llm_hidden=512, llm_layers=2,
                      llm_heads=8, llm_kv_heads=2, vocab_size=2000)


def samples(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in LENGTHS:
        ids = torch.randint(0, vocab, (1, n), generator=g)
        labels = torch.full_like(ids, -100)
        labels[0, :-1] = ids[0, 1:]  # pre-shifted; the last position has no target inside the sample
        out.append(dict(input_ids=ids, labels=labels, position_ids=torch.arange(n)[None]))
    return out


def packed(parts: list[dict]) -> dict:
    lens = torch.tensor([p["input_ids"].shape[1] for p in parts])
    cat = {k: torch.cat([p[k] for p in parts], dim=1) for k in ("input_ids", "labels", "position_ids")}
    return {**cat, "cu_seq_lens": torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).int(),
            "max_seq_len": int(lens.max()), "seq_lens": lens}


def run(model, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the logits of every token in sample order, fp32; the LLM's flattened gradient of the summed loss)."""
    model.zero_grad(set_to_none=True)
    logits = []
    for b in batches:
        b = {k: v.to(DEV) if torch.is_tensor(v) else v for k, v in b.items()}
        out = model(b).logits
        loss, _ = compute_loss(out, b["labels"])
        if loss.requires_grad:  # the one-token sample has no label
            loss.backward()
        logits.append(out.float().reshape(-1, out.shape[-1]).detach())
    grad = torch.cat([p.grad.float().flatten() for n, p in model.named_parameters()
                      if n.startswith("llm.") and p.grad is not None])
    return torch.cat(logits), grad


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm())


@pytest.mark.parametrize("backend", ["sdpa", "flex", "varlen"])
def test_packed_backend_matches_the_exact_unpacked_path(ckpt, backend):
    exact = load_model(ckpt, dtype=torch.float32).to(DEV).eval()
    parts = samples(exact.config.vocab_size)
    ref_logits, ref_grad = run(exact, parts)
    bf16 = load_model(ckpt, dtype=torch.bfloat16).to(DEV).eval()
    noise_logits, noise_grad = run(bf16, parts)  # bf16, unpacked: the rounding floor
    use_packed_attention(bf16, backend)
    logits, grad = run(bf16, [packed(parts)])
    floor_l, floor_g = rel(noise_logits, ref_logits), rel(noise_grad, ref_grad)
    assert rel(logits, ref_logits) <= 3 * floor_l + 2e-3, (rel(logits, ref_logits), floor_l)
    assert rel(grad, ref_grad) <= 3 * floor_g + 2e-3, (rel(grad, ref_grad), floor_g)


def test_the_comparison_sees_a_row_whose_attention_crosses_samples(ckpt):
    """The control: the same packed row with positions 0..L-1 (no restart, so no block mask) is far off."""
    exact = load_model(ckpt, dtype=torch.float32).to(DEV).eval()
    parts = samples(exact.config.vocab_size)
    ref_logits, _ = run(exact, parts)
    row = packed(parts)
    crossing = {k: v for k, v in row.items() if k not in ("cu_seq_lens", "max_seq_len")}
    crossing["position_ids"] = torch.arange(row["input_ids"].shape[1])[None]
    logits, _ = run(exact, [crossing])
    assert rel(logits, ref_logits) > 0.05
