"""Merge publication and verification: atomic output, rerun no-op, interrupted runs, a wrong merge is caught.

    .venv/bin/python -m pytest tests/unit/merge/test_merge_atomic.py -q
"""
from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config

import raytune_minicpmv.merge.merger as merge_mod
from raytune_minicpmv.config import MergeConfig
from raytune_minicpmv.merge.merger import MANIFEST, merge_adapter
from raytune_minicpmv.merge.verify import MergeVerificationError


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_atomic")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "base", max_shard_size="40KB")
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  modules_to_save=["embed_tokens"], init_lora_weights=False))
    peft_model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def _mtimes(path):
    return {p.name: p.stat().st_mtime_ns for p in path.iterdir()}


def test_rerun_is_a_noop_and_other_inputs_are_refused(tmp_path, base_and_adapter):
    base, adapter = base_and_adapter
    cfg = MergeConfig(dtype="fp32", verify_samples=1, verify_atol=1e-4)
    out = merge_adapter(base, adapter, tmp_path / "merged", cfg)
    manifest = json.loads((out / MANIFEST).read_text())
    verification = manifest["verification"]
    assert verification["max_abs_diff"] <= 1e-4 < verification["adapter_effect"] and manifest["adapter"] == str(adapter)
    before = _mtimes(out)
    assert merge_adapter(base, adapter, out, cfg) == out
    assert _mtimes(out) == before
    with pytest.raises(FileExistsError, match="other inputs"):
        merge_adapter(base, adapter, out, MergeConfig(dtype="bf16", verify_samples=0))
    (tmp_path / "foreign").mkdir()
    with pytest.raises(FileExistsError, match="not a finished merge"):
        merge_adapter(base, adapter, tmp_path / "foreign", cfg)


def test_failure_midway_leaves_no_output_and_a_rerun_finishes(tmp_path, base_and_adapter, monkeypatch):
    base, adapter = base_and_adapter
    real, calls = merge_mod.merged_tensor, []

    def failing(key, *args, **kwargs):
        calls.append(key)
        if len(calls) == 6:
            raise RuntimeError("injected: process died while writing shards")
        return real(key, *args, **kwargs)

    monkeypatch.setattr(merge_mod, "merged_tensor", failing)
    out, tmp = tmp_path / "merged", tmp_path / ".merged.merging"
    with pytest.raises(RuntimeError, match="injected"):
        merge_adapter(base, adapter, out, MergeConfig(verify_samples=0))
    assert not out.exists() and any(tmp.iterdir())  # partial shards exist only in the temp dir
    monkeypatch.setattr(merge_mod, "merged_tensor", real)
    merge_adapter(base, adapter, out, MergeConfig(verify_samples=0))
    assert (out / MANIFEST).is_file() and not tmp.exists()


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_verification_catches_a_wrong_merge(tmp_path, base_and_adapter, monkeypatch, dtype):
    base, adapter = base_and_adapter
    real = merge_mod.merged_tensor
    target = "model.layers.1.self_attn.v_proj.weight"

    def corrupt(key, base_tensor, adapter_, out_dtype):  # "forgot" this tensor's LoRA delta
        if key == target:
            return base_tensor.to(out_dtype)
        return real(key, base_tensor, adapter_, out_dtype)

    monkeypatch.setattr(merge_mod, "merged_tensor", corrupt)
    cfg = MergeConfig(dtype=dtype, verify_samples=2)  # the measured tolerance
    with pytest.raises(MergeVerificationError, match="does not reproduce adapter-on-base"):
        merge_adapter(base, adapter, tmp_path / "merged", cfg)
    assert not (tmp_path / "merged").exists()
    monkeypatch.setattr(merge_mod, "merged_tensor", real)
    out = merge_adapter(base, adapter, tmp_path / "merged", cfg)  # the correct merge passes the same check
    assert json.loads((out / MANIFEST).read_text())["verification"]["samples"] == 2
