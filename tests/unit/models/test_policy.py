"""Trainable-parameter policies: explicit per-part settings, the seed_compat preset, LoRA regexes, counts.

Golden counts below are for `build_tiny("minicpmv2_6", query_num=16)` (LLM hidden 128, 2 layers, 2 heads / 1 kv
head, mlp 512, vocab 1563; vision hidden 64, 2 layers, mlp 128): computed once with `trainable_parameter_counts`
and checked by hand: LoRA r=8 on q (128->128), k and v (128->64): 8*256 + 2*8*192 = 5120 per layer, x2 layers;
resampler = query 16*128 + kv_proj 64*128 + in_proj 3*128*128+384 + out_proj 128*128+128 + 3 LNs 768 + proj 128*128
= 93,440; vision = patch 64*588+64 + positions 4900*64 + 2 layers * 33,472 + post LN 128 = 418,368.
Run: pytest tests/unit/models/test_policy.py   (seconds)
"""
from __future__ import annotations

import pytest
import torch

from raytune_minicpmv.config import LoraConfig, TrainableConfig
from raytune_minicpmv.models import (apply_trainable_policy, build_tiny, compute_loss, enable_gradient_checkpointing,
                                     format_parameter_table, load_model, trainable_parameter_counts)

SEED_REGEX = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj)"  # the official script's default, verbatim
LORA = LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=SEED_REGEX)
VISION_TOTAL, RESAMPLER_TOTAL, EMBED_TOTAL, LLM_TOTAL = 418_368, 93_440, 200_064, 692_736  # see module docstring


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny("minicpmv2_6", tmp_path_factory.mktemp("tiny"), query_num=16)


def policy(ckpt, **trainable):
    return apply_trainable_policy(load_model(ckpt, dtype=torch.float32), TrainableConfig(**trainable), LORA)


def test_full_and_frozen_parts(ckpt):
    full = policy(ckpt, vision="full", resampler="full", llm="full", embed_tokens="full")
    assert trainable_parameter_counts(full) == {"vision": VISION_TOTAL, "resampler": RESAMPLER_TOTAL,
                                                "embed_tokens": EMBED_TOTAL, "llm": LLM_TOTAL, "lora": 0,
                                                "total": VISION_TOTAL + RESAMPLER_TOTAL + EMBED_TOTAL + LLM_TOTAL}
    only_resampler = policy(ckpt, vision="frozen", resampler="full", llm="frozen", embed_tokens="frozen")
    counts = trainable_parameter_counts(only_resampler)
    assert counts["resampler"] == counts["total"] == RESAMPLER_TOTAL
    assert not hasattr(only_resampler, "peft_config")  # no LoRA part: no PEFT wrapper


def test_default_policy_lora_llm_plus_full_resampler(ckpt):
    model = policy(ckpt)  # vision frozen, resampler full, llm lora, embed_tokens frozen
    counts = trainable_parameter_counts(model)
    assert counts == {"vision": 0, "resampler": RESAMPLER_TOTAL, "embed_tokens": 0, "llm": 0, "lora": 10_240,
                      "total": RESAMPLER_TOTAL + 10_240}
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert lora_modules == {f"base_model.model.llm.model.layers.{i}.self_attn.{p}" for i in range(2)
                            for p in ("q_proj", "k_proj", "v_proj")}
    assert "lm_head" in format_parameter_table(model) or "llm" in format_parameter_table(model)


def test_seed_compat_preset_matches_official_lora_script(ckpt):
    model = policy(ckpt, preset="seed_compat", vision="full")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    # LoRA on the regex + trained copies (PEFT modules_to_save) of embed_tokens, resampler and vpm; lm_head frozen.
    assert any(".modules_to_save.default." in n and "embed_tokens" in n for n in trained)
    assert any(n.startswith("base_model.model.resampler.modules_to_save.default.") for n in trained)
    assert any(n.startswith("base_model.model.vpm.modules_to_save.default.") for n in trained)
    assert not any("lm_head" in n or "original_module" in n for n in trained)
    assert model.peft_config["default"].task_type is None
    assert trainable_parameter_counts(model) == {
        "vision": VISION_TOTAL, "resampler": RESAMPLER_TOTAL, "embed_tokens": EMBED_TOTAL, "llm": 0, "lora": 10_240,
        "total": VISION_TOTAL + RESAMPLER_TOTAL + EMBED_TOTAL + 10_240}
    no_vision = trainable_parameter_counts(policy(ckpt, preset="seed_compat", vision="frozen"))
    assert no_vision["vision"] == 0 and no_vision["embed_tokens"] == EMBED_TOTAL


def test_vision_lora_uses_the_vision_regex(ckpt):
    model = policy(ckpt, vision="lora", resampler="frozen", llm="frozen", embed_tokens="frozen")
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all(".vpm.encoder.layers." in n and ".lora_" in n for n in lora)
    assert {n.split(".self_attn.")[1].split(".")[0] for n in lora} == {"q_proj", "k_proj", "v_proj", "out_proj"}


def test_llm_full_with_lora_elsewhere_is_refused(ckpt):
    with pytest.raises(ValueError, match="trainable.llm=full"):
        policy(ckpt, vision="lora", llm="full")


def test_counts_use_ds_numel_under_zero3(ckpt):
    model = load_model(ckpt, dtype=torch.float32)
    p = model.resampler.query
    p.ds_numel = p.numel() * 2  # what a ZeRO-3 partitioned parameter carries (its local numel is a shard)
    assert trainable_parameter_counts(model, trainable_only=False)["resampler"] == RESAMPLER_TOTAL + p.numel()


def test_lora_with_frozen_embeddings_and_checkpointing_trains(ckpt):
    model = policy(ckpt)
    enable_gradient_checkpointing(model)
    model.train()
    from test_model_forward import make_batch  # tests/unit is on sys.path (pytest rootdir import mode)

    batch = make_batch()
    loss_sum, n = compute_loss(model(batch).logits, batch["labels"])
    (loss_sum / n).backward()
    lora_b = [p.grad for name, p in model.named_parameters() if ".lora_B." in name]
    assert lora_b and all(g is not None and torch.count_nonzero(g) > 0 for g in lora_b)
