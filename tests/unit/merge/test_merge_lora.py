"""Merge math and checkpoint layout against PEFT itself, on tiny random causal LMs (no Ray).

    .venv/bin/python -m pytest tests/unit/merge/test_merge_lora.py -q

The reference is always PEFT: the same adapter loaded with `PeftModel.from_pretrained` and folded with
`merge_and_unload()`; in fp32 our streamed merge must equal it tensor for tensor.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

from raytune_minicpmv.config import MergeConfig
from raytune_minicpmv.merge.adapter import UnsupportedAdapterError
from raytune_minicpmv.merge.merger import MANIFEST, merge_adapter
from raytune_minicpmv.merge.safetensors_stream import INDEX_FILE, CheckpointReader


def tiny_qwen2(path: Path, shard: str = "40KB") -> Path:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path, max_shard_size=shard)
    (path / "generation_config.json").write_text('{"do_sample": false}')
    (path / "modeling_extra.py").write_text("# remote code a loader may need\n")
    (path / "preprocessor_config.json").write_text('{"max_slice_nums": 9}')
    (path / "sub").mkdir()
    (path / "sub" / "notes.txt").write_text("kept")
    return path


def tiny_gpt2(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path, max_shard_size="40KB")
    return path


def train_adapter(base: Path, out: Path, **lora_kwargs) -> Path:
    """A PEFT adapter with random (non-zero) LoRA factors and perturbed modules_to_save copies, as if trained."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad and "lora_" not in name:  # modules_to_save copies and trained biases
                p.add_(torch.randn_like(p) * 0.5)
    peft_model.save_pretrained(out)
    return out


def peft_merged_state(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def read_all(ckpt: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(ckpt)
    return {k: reader.get(k) for k in reader.keys()}


FP32 = MergeConfig(dtype="fp32", verify_samples=0, max_shard_size="50KB")

CASES = {
    "qwen2_rslora_patterns_modules_to_save": dict(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=8, lora_alpha=16, use_rslora=True,
        rank_pattern={"k_proj": 4}, alpha_pattern={"layers.1.self_attn.o_proj": 3}, modules_to_save=["embed_tokens"],
        task_type="CAUSAL_LM"),
    "qwen2_embedding_lora_no_task_type": dict(target_modules=["q_proj", "v_proj", "embed_tokens"], r=4, lora_alpha=8),
    "qwen2_lora_bias": dict(target_modules=["q_proj", "k_proj", "v_proj"], r=4, lora_alpha=8, lora_bias=True),
    "gpt2_fan_in_fan_out_bias_all": dict(
        target_modules=["c_attn", "c_proj"], r=4, lora_alpha=4, fan_in_fan_out=True, bias="all"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_merge_equals_peft_merge_and_unload(tmp_path, case):
    base = (tiny_gpt2 if case.startswith("gpt2") else tiny_qwen2)(tmp_path / "base")
    adapter = train_adapter(base, tmp_path / "adapter", **CASES[case])
    out = merge_adapter(base, adapter, tmp_path / "merged", FP32)

    ours, expected = read_all(out), peft_merged_state(base, adapter)
    assert set(ours) == set(CheckpointReader(base).keys())
    different = [k for k in ours if not torch.equal(ours[k], expected[k])]
    assert different == []
    changed = [k for k in ours if not torch.equal(ours[k], read_all(base)[k])]
    assert len(changed) >= 4  # the merge did something: LoRA targets (and trained copies) moved


def test_multi_shard_layout_files_and_modules_to_save(tmp_path):
    base = tiny_qwen2(tmp_path / "base")
    assert len(CheckpointReader(base).weight_files) >= 3
    adapter = train_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                            modules_to_save=["embed_tokens"])
    out = merge_adapter(base, adapter, tmp_path / "merged", MergeConfig(dtype="bf16", verify_samples=0,
                                                                        max_shard_size="30KB"))
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((out / s).is_file() for s in shards)
    sizes = {k: 0 for k in shards}
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            assert {index["weight_map"][k] for k in f.keys()} == {shard}
            sizes[shard] = sum(f.get_tensor(k).numel() * 2 for k in f.keys())
    assert index["metadata"]["total_size"] == sum(sizes.values())
    # every tensor is bf16; the trained embedding copy replaced the base one
    merged = read_all(out)
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    trained = load_file(adapter / "adapter_model.safetensors")["base_model.model.model.embed_tokens.weight"]
    assert torch.equal(merged["model.embed_tokens.weight"], trained.to(torch.bfloat16))
    assert not torch.equal(merged["model.embed_tokens.weight"], read_all(base)["model.embed_tokens.weight"].bfloat16())
    # bf16 = the fp32 fold, rounded once
    expected = peft_merged_state(base, adapter)["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], expected.to(torch.bfloat16))
    # every non-weight file came along; config.json names the new dtype; transformers loads it strictly
    for rel in ("config.json", "generation_config.json", "modeling_extra.py", "preprocessor_config.json",
                "sub/notes.txt"):
        assert (out / rel).is_file(), rel
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (out / MANIFEST).is_file()


def test_official_script_layout_and_old_side_file(tmp_path):
    """Keys with `modules_to_save.default.`, no task_type, plus vpm_resampler_embedtokens.pt (applied last)."""
    base = tiny_qwen2(tmp_path / "base")
    adapter = train_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "k_proj"], r=4, lora_alpha=8,
                            modules_to_save=["embed_tokens"])
    expected = peft_merged_state(base, adapter)  # before the rewrite below: PEFT reads only its own key layout
    tensors = load_file(adapter / "adapter_model.safetensors")
    renamed = {k.replace("embed_tokens.weight", "embed_tokens.modules_to_save.default.weight"): v
               for k, v in tensors.items()}
    assert renamed != tensors
    save_file(renamed, adapter / "adapter_model.safetensors")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.pop("task_type", None)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    side = {"model.norm.weight": torch.full((32,), 3.0), "base_model.model.lm_head.weight": torch.ones(256, 32)}
    torch.save(side, adapter / "vpm_resampler_embedtokens.pt")

    merged = read_all(merge_adapter(base, adapter, tmp_path / "merged", FP32))
    assert torch.equal(merged["model.norm.weight"], side["model.norm.weight"])
    assert torch.equal(merged["lm_head.weight"], side["base_model.model.lm_head.weight"])
    for k in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert torch.equal(merged[k], expected[k]), k


def test_unsupported_and_mismatched_adapters_are_refused_before_writing(tmp_path):
    base = tiny_qwen2(tmp_path / "base")
    dora = train_adapter(base, tmp_path / "dora", target_modules=["q_proj"], r=4, use_dora=True)
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        merge_adapter(base, dora, tmp_path / "m1", FP32)
    other = tiny_gpt2(tmp_path / "gpt2")
    wrong = train_adapter(other, tmp_path / "wrong", target_modules=["c_attn"], r=4, fan_in_fan_out=True)
    with pytest.raises(ValueError, match="transformer.h.0.attn.c_attn.weight, which the base checkpoint does not"):
        merge_adapter(base, wrong, tmp_path / "m2", FP32)
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()


def test_full_finetune_checkpoint_and_zero3_unGathered_adapter(tmp_path):
    base = tiny_qwen2(tmp_path / "base")
    ckpt = tmp_path / "checkpoint_000001"
    (ckpt / "full_model").mkdir(parents=True)
    trained = {"model.layers.0.mlp.up_proj.weight": torch.randn(64, 32), "model.norm.weight": torch.randn(32)}
    save_file(trained, ckpt / "full_model" / "model.safetensors")
    merged = read_all(merge_adapter(base, ckpt / "adapter", tmp_path / "merged", FP32))  # no adapter/: full_model/
    assert all(torch.equal(merged[k], v) for k, v in trained.items())
    assert torch.equal(merged["lm_head.weight"], read_all(base)["lm_head.weight"])

    zero3 = train_adapter(base, tmp_path / "zero3", target_modules=["q_proj"], r=4)
    flat = {k: v.reshape(-1)[:0] if "lora_" in k else v for k, v in load_file(zero3 / "adapter_model.safetensors").items()}
    save_file(flat, zero3 / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="ZeRO-3"):
        merge_adapter(base, zero3, tmp_path / "m3", FP32)
