"""`model.quantization` (QLoRA): what a bitsandbytes base cannot do is refused up front, every problem at once, and
the `auto` engine choice never lands on ZeRO-3 for it.

    .venv/bin/python -m pytest tests/unit/test_config_quantization.py -q
"""
from __future__ import annotations

import json

import pytest

from raytune_minicpmv.config import ConfigError, load_config
from raytune_minicpmv.train.engine_plan import GIB, MicroBatch, ModelSize, choose, estimate_bytes

BENCH = ModelSize(total=2_650_000_000, trainable=440_000_000, llm_hidden=1536, llm_layers=28,
                  llm_intermediate=8960, vocab=151_666, vision_hidden=1152, vision_layers=27,
                  vision_intermediate=4304, patches_per_crop=1024, quantized=1_310_000_000)


def problems(*overrides, check_paths=False) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(None, list(overrides), check_paths=check_paths)
    return e.value.problems


def test_qlora_defaults_load():
    cfg = load_config(None, ["model.quantization=nf4", "deepspeed.zero_stage=2"], check_paths=False)
    assert cfg.model.quantization == "nf4" and cfg.trainable.llm == "lora"
    assert load_config(None, [], check_paths=False).model.quantization == "none"


def test_unknown_quantization_names_the_choices():
    (p,) = problems("model.quantization=int4")
    assert p.startswith("model.quantization") and "nf4" in p and "int8" in p


def test_every_impossible_combination_is_listed_at_once_with_its_reason():
    found = problems("model.quantization=nf4", "trainable.llm=full", "trainable.resampler=frozen",
                     "deepspeed.zero_stage=3", "deepspeed.offload_param=cpu")
    assert [p.split(":")[0] for p in found] == ["trainable.llm", "deepspeed.zero_stage", "deepspeed.offload_param"]
    assert "packed integers without gradients" in found[0] and "trainable.llm=lora" in found[0]
    assert "bitsandbytes layout" in found[1] and "zero_stage 0, 1, 2 or auto" in found[1]


@pytest.mark.parametrize("ok", [["trainable.llm=lora"], ["trainable.llm=frozen"], ["trainable.preset=seed_compat"],
                                ["deepspeed.zero_stage=auto"], ["deepspeed.zero_stage=0"]])
def test_qlora_settings_that_work_load(ok):
    load_config(None, ["model.quantization=int8", *ok], check_paths=False)


def test_the_same_rules_without_quantization_stay_allowed():
    load_config(None, ["trainable.llm=full", "deepspeed.zero_stage=3", "deepspeed.offload_param=cpu"],
                check_paths=False)


def _fake_prequantized(tmp_path, skip):
    ckpt = tmp_path / "int4"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({
        "model_type": "minicpmv", "version": 2.6, "quantization_config": {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
            "llm_int8_skip_modules": skip}}))
    return ckpt


def test_a_prequantized_checkpoint_must_be_named_and_its_quantized_vision_cannot_train_in_full(tmp_path):
    ckpt = _fake_prequantized(tmp_path, ["out_proj", "kv_proj", "lm_head"])
    found = problems(f"model.path={ckpt}", check_paths=True)  # quantization none on an nf4 checkpoint
    assert any(p.startswith("model.quantization: none") and "set model.quantization=nf4" in p for p in found), found
    found = problems(f"model.path={ckpt}", "model.quantization=int8", "trainable.vision=full", check_paths=True)
    assert any("pre-quantized as nf4" in p and "set model.quantization=nf4" in p for p in found), found
    assert any(p.startswith("trainable.vision: full") and "vision tower" in p for p in found), found


def test_a_prequantized_checkpoint_that_keeps_its_vision_tower_may_train_it_in_full(tmp_path):
    ckpt = _fake_prequantized(tmp_path, ["vpm", "resampler", "lm_head"])
    found = problems(f"model.path={ckpt}", "model.quantization=nf4", "trainable.vision=full", check_paths=True)
    assert not any("quantiz" in p for p in found), found  # other problems (no data, family) are not ours


def test_auto_never_picks_zero3_for_a_quantized_base_and_counts_packed_weights():
    mb = MicroBatch(llm_tokens=8 * 2048, crops=8 * 10)
    tight = 12 * GIB  # nothing fits: the unquantized plan falls back to ZeRO-3
    plain = choose(load_config(None, ["model.dtype=bf16"], check_paths=False), BENCH, mb, 4, tight)
    assert plain.stage == 3
    cfg = load_config(None, ["model.dtype=bf16", "model.quantization=nf4"], check_paths=False)
    plan = choose(cfg, BENCH, mb, 4, tight)
    assert 3 not in {c.stage for c in plan.tried} and plan.stage in (0, 1, 2)
    saved = estimate_bytes(load_config(None, ["model.dtype=bf16"], check_paths=False), BENCH, mb, 1, 2, True) \
        - estimate_bytes(cfg, BENCH, mb, 1, 2, True)
    assert saved == pytest.approx((2 - 0.52) * BENCH.quantized, rel=1e-6)
