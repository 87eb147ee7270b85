"""Merge verification on a model whose logits look like a trained LLM's (std of several units, max in the tens).

    .venv/bin/python -m pytest tests/unit/merge/test_merge_verify.py -q

The tiny random models of the other merge tests have logits below 1, where bf16 steps are ~0.004 and any small
absolute tolerance works. A trained LLM's logits reach the tens, where one bf16 step is 0.125: there a correct bf16
merge (even one bit-identical to PEFT's `merge_and_unload`) differs from adapter-on-base by more than the old fixed
5e-2. These tests check that the measured tolerance lets every correct merge through and still stops wrong ones.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config

import raytune_minicpmv.merge.merger as merge_mod
from raytune_minicpmv.config import MergeConfig
from raytune_minicpmv.merge.merger import MANIFEST, merge_adapter
from raytune_minicpmv.merge.verify import MergeVerificationError, dtype_step, tolerance

HIDDEN, VOCAB = 128, 512
DROPPED = "model.layers.1.self_attn.v_proj.weight"


def realistic_lm(path):
    """A 4-layer Qwen2 whose output head gives trained-LLM-like logits: unit-variance hidden states times a head of
    norm ~4, and 16 "frequent" tokens with 3x larger rows (the heavy upper tail). Deterministic (seeded)."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        head = model.lm_head.weight
        head.normal_(0, 4.0 / math.sqrt(HIDDEN), generator=torch.Generator().manual_seed(0))
        head[:16].mul_(3.0)
    model.to(torch.bfloat16).save_pretrained(path)  # published checkpoints are bf16
    return path


def realistic_adapter(base, path):
    """LoRA r=8 on every attention and MLP projection, factors scaled like a short fine-tune (moves logits by units)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.normal_(0, 1 / math.sqrt(p.shape[1]), generator=g)
            elif "lora_B" in name:
                p.normal_(0, 0.004, generator=g)  # moves the logits by ~7 at most
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_verify")
    base = realistic_lm(root / "base")
    return base, realistic_adapter(base, root / "adapter")


def _logit_stats(base):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return logits.std().item(), logits.abs().max().item()


def _verification(out):
    return json.loads((out / MANIFEST).read_text())["verification"]


def test_the_fixture_has_trained_llm_logits(realistic):
    std, absmax = _logit_stats(realistic[0])
    assert 3.0 <= std <= 8.0 and 20.0 <= absmax <= 60.0, (std, absmax)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_a_correct_merge_passes_with_the_default_tolerance(tmp_path, realistic, dtype):
    base, adapter = realistic
    out = merge_adapter(base, adapter, tmp_path / "merged", MergeConfig(dtype=dtype))
    v = _verification(out)
    assert v["atol_source"] == "measured" and v["max_abs_diff"] <= v["atol"]
    assert v["adapter_effect"] > 5 * v["atol"]  # the bound is well below what the adapter does
    if dtype == "bf16":
        # our merge is what PEFT's own bf16 fold gives, yet it moves logits in the tens by several bf16 steps:
        # more than the old fixed bound of 5e-2, which rejected exactly such merges
        assert v["max_abs_diff"] > 5e-2 and v["noise"] > 5e-2
        assert v["atol"] == pytest.approx(3.0 * v["noise"])
    else:
        assert v["atol"] < 1e-3


def _drop_one_delta(real):
    def merged(key, base_tensor, adapter, out_dtype):
        if key == DROPPED:
            assert key in adapter.lora  # it really is a LoRA target that loses its delta
            return base_tensor.to(out_dtype)
        return real(key, base_tensor, adapter, out_dtype)
    return merged


def _double_the_scale(real):
    def merged(key, base_tensor, adapter, out_dtype):
        factors = adapter.lora.get(key)
        if factors is None:
            return real(key, base_tensor, adapter, out_dtype)
        old, factors.scaling = factors.scaling, 2 * factors.scaling  # e.g. alpha/r read as 2*alpha/r
        try:
            return real(key, base_tensor, adapter, out_dtype)
        finally:
            factors.scaling = old
    return merged


@pytest.mark.parametrize("wrong", [_drop_one_delta, _double_the_scale], ids=["one_delta_dropped", "scale_x2"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_a_wrong_merge_fails_with_the_default_tolerance(tmp_path, realistic, monkeypatch, wrong, dtype):
    base, adapter = realistic
    monkeypatch.setattr(merge_mod, "merged_tensor", wrong(merge_mod.merged_tensor))
    with pytest.raises(MergeVerificationError, match="does not reproduce adapter-on-base.*rounding noise"):
        merge_adapter(base, adapter, tmp_path / "merged", MergeConfig(dtype=dtype))
    assert not (tmp_path / "merged").exists()


def test_a_fixed_verify_atol_overrides_the_measured_bound(tmp_path, realistic):
    base, adapter = realistic
    with pytest.raises(MergeVerificationError, match=r"merge.verify_atol=0.05"):
        merge_adapter(base, adapter, tmp_path / "merged", MergeConfig(dtype="bf16", verify_atol=5e-2))


def test_tolerance_rules():
    fixed, measured = MergeConfig(verify_atol=1e-3), MergeConfig(verify_noise_factor=4.0)
    assert tolerance(fixed, torch.bfloat16, noise=0.5, logits_absmax=30.0) == 1e-3
    assert tolerance(measured, torch.bfloat16, noise=0.5, logits_absmax=30.0) == 2.0
    # no LoRA to fold (a full_model/ dir): two bf16 steps at the largest logit; the same floor under a tiny noise
    assert tolerance(measured, torch.bfloat16, noise=None, logits_absmax=30.0) == 0.25
    assert tolerance(measured, torch.bfloat16, noise=1e-9, logits_absmax=30.0) == 0.25
    assert dtype_step(torch.bfloat16, 20.0) == 0.125 and dtype_step(torch.bfloat16, 16.0) == 0.125
    assert dtype_step(torch.bfloat16, 15.9) == 0.0625
    assert dtype_step(torch.float32, 0.3) == dtype_step(torch.float32, 1.0) == 2.0 ** -23
    assert dtype_step(torch.float16, 1000.0) == 0.5
