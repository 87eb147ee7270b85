"""MiniCPM-V 4.6 / 4.7 through our model layer: family detection, strict loading, trainable parts, LoRA targets,
and the training forward/backward against a plain transformers forward of the same model on the same batch.

Tiny checkpoints (tests/conftest.py `tiny46` / `tiny47`): vision hidden 32, 3 layers (window merger after layer 1),
LLM hidden 64, 4 layers = 3 Gated-DeltaNet + 1 full attention, lm_head tied to embed_tokens.
Batches come from transformers' own processor (models.processor4.load_processor4), at scale_resolution 112
instead of 448 (64 patches per crop: CPU time). Run: pytest tests/unit/models/test_v4_families.py (~1-2 min).
"""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from PIL import Image
from transformers import MiniCPMV4_6ForConditionalGeneration, MiniCPMV4_7ForConditionalGeneration

from raytune_minicpmv.config import Config, ConfigError, LoraConfig, TrainableConfig, config_from_dict, validate
from raytune_minicpmv.models import (FAMILIES, CheckpointError, apply_trainable_policy, compute_loss,
                                     enable_gradient_checkpointing, get_family, load_model, part_of,
                                     trainable_parameter_counts)
from raytune_minicpmv.models.forward import family_supports_packing, forward_logits
from raytune_minicpmv.models.processor4 import load_processor4

LORA = LoraConfig(r=4, alpha=8, dropout=0.0)  # the 2.x default regexes: a 4.x model uses its family's targets


def images():
    # one unsliced crop, and an odd-sized wide image that slices (thumbnail + a row of slices)
    return [Image.new("RGB", (120, 90), (20, 180, 40)), Image.new("RGB", (610, 230), (200, 30, 30))]


def labelled_batch(processor, texts: list[str], imgs: list, answer_tokens: int = 6) -> dict:
    """The processor's batch plus `labels`: the last `answer_tokens` real tokens of each row as pre-shifted targets
    (-100 elsewhere), the convention of the data stage's labels."""
    batch = dict(processor(text=texts, images=imgs or None))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = torch.full_like(ids, -100)
    for r in range(ids.shape[0]):
        last = mask[r].nonzero().flatten()[-answer_tokens - 1:]
        labels[r, last[:-1]] = ids[r, last[1:]]  # position t predicts token t+1
    batch["labels"] = labels
    return batch


def batch_for(ckpt, family, downsample_mode="16x"):
    proc = load_processor4(ckpt, family, downsample_mode=downsample_mode)
    proc.image_processor.scale_resolution, proc.image_processor.max_slice_nums = 112, 3
    texts = ["<|im_start|>user\n<|image_pad|>What is it?<|im_end|>\n<|im_start|>assistant\na green box<|im_end|>",
             "<|im_start|>user\n<|image_pad|>And this?<|im_end|>\n<|im_start|>assistant\na wide red one<|im_end|>"]
    return labelled_batch(proc, texts, images())


@pytest.mark.parametrize("family,cls", [("minicpmv4_6", MiniCPMV4_6ForConditionalGeneration),
                                        ("minicpmv4_7", MiniCPMV4_7ForConditionalGeneration)])
def test_family_detected_and_loaded_with_transformers_class(family, cls, request):
    ckpt = request.getfixturevalue("tiny46" if family == "minicpmv4_6" else "tiny47")
    assert get_family(ckpt).name == family and get_family(ckpt).hf_native
    assert (ckpt / "model.safetensors.index.json").is_file()  # sharded like a real download
    model = load_model(ckpt, dtype=torch.float32)
    assert type(model) is cls
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied, as the real 4.6
    assert model.config.text_config.layer_types == ["linear_attention"] * 3 + ["full_attention"]


def test_loader_lists_missing_keys(tiny46, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny46, broken)
    raw = json.loads((broken / "config.json").read_text())
    raw["text_config"]["num_hidden_layers"] = 8  # config promises layers 4-7; the weights have none
    raw["text_config"]["layer_types"] = raw["text_config"]["layer_types"] * 2
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"missing keys: .*model\.language_model\.layers\.7\."):
        load_model(broken, dtype=torch.float32)


def test_parts_of_the_v4_layout():
    assert part_of("model.vision_tower.encoder.layers.0.self_attn.q_proj.weight") == "vision"
    assert part_of("model.vision_tower.vit_merger.linear_1.weight") == "resampler"
    assert part_of("base_model.model.model.merger.mlp.0.linear_1.weight") == "resampler"
    assert part_of("base_model.model.model.merger.modules_to_save.default.mlp.0.linear_1.weight") == "resampler"
    assert part_of("model.language_model.embed_tokens.weight") == "embed_tokens"
    assert part_of("model.language_model.layers.0.linear_attn.in_proj_qkv.weight") == "llm"
    assert part_of("base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_A.default.weight") == "lora"


def test_default_policy_lora_on_both_layer_kinds_connector_full(tiny46):
    model = apply_trainable_policy(load_model(tiny46, dtype=torch.float32), TrainableConfig(), LORA)
    lora = {n.split(".lora_A")[0].removeprefix("base_model.model.") for n, _ in model.named_parameters()
            if ".lora_A." in n}
    linear = {f"model.language_model.layers.{i}.linear_attn.{p}" for i in range(3)
              for p in ("in_proj_qkv", "in_proj_z", "out_proj")}
    full = {f"model.language_model.layers.3.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert lora == linear | full  # every layer adapted, not only the full-attention quarter
    trained = {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    assert trained and all(".modules_to_save.default." in n for n in trained)
    assert {part_of(n) for n in trained} == {"resampler"}
    assert any(".vit_merger." in n for n in trained) and any("model.merger." in n for n in trained)
    counts = trainable_parameter_counts(model)
    assert counts["vision"] == counts["embed_tokens"] == counts["llm"] == 0


def test_full_parts_without_lora_and_tied_head(tiny46):
    base = load_model(tiny46, dtype=torch.float32)
    total = trainable_parameter_counts(base, trainable_only=False)
    model = apply_trainable_policy(base, TrainableConfig(vision="frozen", resampler="frozen", llm="full",
                                                         embed_tokens="full"), LORA)
    assert not hasattr(model, "peft_config")
    counts = trainable_parameter_counts(model)
    assert counts["llm"] == total["llm"] and counts["embed_tokens"] == total["embed_tokens"] > 0
    assert counts["vision"] == counts["resampler"] == 0
    assert model.lm_head.weight.requires_grad  # the head is the embedding: trained with it


def test_vision_lora_targets_encoder_attention(tiny46):
    model = apply_trainable_policy(load_model(tiny46, dtype=torch.float32),
                                   TrainableConfig(vision="lora", llm="frozen", resampler="frozen"), LORA)
    lora = {n.split(".lora_A")[0].removeprefix("base_model.model.") for n, _ in model.named_parameters()
            if ".lora_A." in n}
    assert lora == {f"model.vision_tower.encoder.layers.{i}.self_attn.{p}" for i in range(3)
                    for p in ("q_proj", "k_proj", "v_proj", "out_proj")}


def test_explicit_lora_regex_is_kept(tiny46):
    custom = LoraConfig(r=4, alpha=8, target_modules=r"model\.language_model\.layers\.\d+\.mlp\.down_proj")
    model = apply_trainable_policy(load_model(tiny46, dtype=torch.float32), TrainableConfig(), custom)
    lora = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert len(lora) == 4 and all(n.endswith("mlp.down_proj") for n in lora)


def test_tied_embedding_copy_keeps_head_tied(tiny46):
    model = apply_trainable_policy(load_model(tiny46, dtype=torch.float32), TrainableConfig(embed_tokens="full"),
                                   LORA)
    base = model.get_base_model()
    # PEFT's trained copy of embed_tokens must also be the head, else training and the merged folder disagree
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    emb_w = emb.modules_to_save["default"].weight
    head_w = head.modules_to_save["default"].weight if hasattr(head, "modules_to_save") else head.weight
    assert emb_w is head_w and emb_w.requires_grad


@pytest.mark.parametrize("family", ["minicpmv4_6", "minicpmv4_7"])
def test_training_forward_backward_equals_plain_transformers(family, request):
    """Our path (forward_logits minus labels, compute_loss sum / count, pre-shifted labels) == transformers'
    own `model(**batch, labels=...)` loss (it shifts internally), and the same gradients, in fp32."""
    ckpt = request.getfixturevalue("tiny46" if family == "minicpmv4_6" else "tiny47")
    ours = load_model(ckpt, dtype=torch.float32).train()
    plain = copy.deepcopy(ours)
    batch = batch_for(ckpt, family)
    assert set(batch) - {"labels"} >= {"input_ids", "attention_mask", "pixel_values", "target_sizes"}
    assert (family == "minicpmv4_7") == ("mm_token_type_ids" in batch)

    loss_sum, n = compute_loss(forward_logits(ours, batch, family), batch["labels"])
    (loss_sum / n).backward()

    hf_labels = torch.full_like(batch["labels"], -100)
    hf_labels[:, 1:] = batch["labels"][:, :-1]  # unshifted: transformers predicts labels[t+1] at position t
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = plain(**inputs, labels=hf_labels, use_cache=False)
    out.loss.backward()

    assert int(n) == 2 * 6
    torch.testing.assert_close(loss_sum / n, out.loss, rtol=1e-5, atol=1e-6)
    names = ["model.language_model.embed_tokens.weight", "model.language_model.layers.0.linear_attn.in_proj_qkv.weight",
             "model.language_model.layers.3.self_attn.q_proj.weight", "model.merger.mlp.0.linear_1.weight",
             "model.vision_tower.vit_merger.linear_1.weight", "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"]
    ours_p, plain_p = dict(ours.named_parameters()), dict(plain.named_parameters())
    for name in names:
        g_ours, g_plain = ours_p[name].grad, plain_p[name].grad
        assert g_ours is not None and g_ours.norm() > 0, name  # the vision tower really is in the graph
        torch.testing.assert_close(g_ours.norm(), g_plain.norm(), rtol=1e-4, atol=1e-7)


def test_downsample_mode_reaches_the_model(tiny46):
    """4x: 4x more visual tokens per crop; a 16x batch fed to a 4x forward is a token/feature count mismatch."""
    model = load_model(tiny46, dtype=torch.float32).eval()
    b4 = batch_for(tiny46, "minicpmv4_6", "4x")
    b16 = batch_for(tiny46, "minicpmv4_6", "16x")
    pad = model.config.image_token_id
    assert int((b4["input_ids"] == pad).sum()) > 3 * int((b16["input_ids"] == pad).sum())
    with torch.no_grad():
        assert forward_logits(model, b4, "minicpmv4_6", "4x").shape[1] == b4["input_ids"].shape[1]
        with pytest.raises(ValueError):
            forward_logits(model, b16, "minicpmv4_6", "4x")


def test_gradient_checkpointing_tower_modes(tiny46):
    model = load_model(tiny46, dtype=torch.float32)
    enable_gradient_checkpointing(model, mode="vision")
    flags = {n: m.gradient_checkpointing for n, m in model.named_modules() if hasattr(m, "gradient_checkpointing")
             and re.search(r"layers\.\d+$", n)}
    assert flags and all(v == n.startswith("model.vision_tower") for n, v in flags.items())


def test_packing_refused_for_hybrid_families():
    assert family_supports_packing("minicpmv2_6")
    assert not family_supports_packing("minicpmv4_6") and not family_supports_packing("minicpmv4_7")


def test_downsample_mode_only_for_v4_families():
    with pytest.raises(ConfigError, match=r"model\.downsample_mode: '4x' is a MiniCPM-V 4\.6/4\.7 setting"):
        config_from_dict({"model": {"family": "minicpmv2_6", "downsample_mode": "4x"}}, check_paths=False)
    good = config_from_dict({"model": {"family": "minicpmv4_6", "downsample_mode": "4x"}}, check_paths=False)
    assert not any("downsample_mode" in p for p in validate(good, check_paths=False))


def test_v2_default_lora_regexes_are_the_config_defaults():
    """The policy swaps in a 4.x family's targets only when the config still has the 2.x defaults."""
    assert LoraConfig().target_modules == FAMILIES["minicpmv2_6"].lora_targets
    assert LoraConfig().vision_target_modules == FAMILIES["minicpmv2_6"].vision_lora_targets
    assert Config().model.downsample_mode == "16x"


def test_packing_rule_in_config_validation():
    """data.packing is refused for 4.x (hybrid linear-attention LLM), allowed for 2.6."""
    import dataclasses

    from raytune_minicpmv.config import DataConfig, ModelConfig, TrainConfig

    for family, refused in (("minicpmv4_6", True), ("minicpmv4_7", True), ("minicpmv2_6", False)):
        cfg = dataclasses.replace(Config(), data=DataConfig(packing=True), model=ModelConfig(family=family),
                                  train=TrainConfig(max_tokens_per_batch=8192))
        problems = [p for p in validate(cfg, check_paths=False) if p.startswith("data.packing:")]
        assert bool(problems) == refused, (family, problems)
        if refused:
            assert "linear-attention" in problems[0] and "data.packing=false" in problems[0]


@pytest.mark.parametrize("family", ["minicpmv4_6", "minicpmv4_7"])
def test_text_only_batch_runs_a_zero_weight_dummy_crop(family, request):
    """A text-only batch gives exactly the plain forward's logits, and the trained connector still gets a (zero)
    gradient: every rank touches the vision side (ZeRO-3 gathers; tests/integration/test_v4_zero3_mixed.py)."""
    ckpt = request.getfixturevalue("tiny46" if family == "minicpmv4_6" else "tiny47")
    base = load_model(ckpt, dtype=torch.float32)
    ids = torch.randint(0, 1500, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask, use_cache=False).logits
    model = apply_trainable_policy(base, TrainableConfig(), LORA)
    logits = forward_logits(model, {"input_ids": ids, "attention_mask": mask, "labels": ids}, family)
    assert torch.equal(logits.detach(), plain)
    logits.sum().backward()
    connector = [p for n, p in model.named_parameters() if p.requires_grad and part_of(n) == "resampler"]
    assert connector and all(p.grad is not None and not p.grad.any() for p in connector)


def test_zero3_for_v4_is_refused_only_with_a_frozen_llm():
    """ZeRO-3 trains 4.x (tests/integration/test_v4_zero3_mixed.py); the one setup that hung there twice (the LLM
    frozen, only the connector trained) is refused up front instead of left to hang a cluster."""
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage: 3 with trainable\.llm=frozen is not supported "
                                          r"for minicpmv4_6"):
        config_from_dict({"model": {"family": "minicpmv4_6"}, "deepspeed": {"zero_stage": 3},
                          "trainable": {"llm": "frozen"}}, check_paths=False)
    config_from_dict({"model": {"family": "minicpmv4_6"}, "deepspeed": {"zero_stage": 3}}, check_paths=False)
    config_from_dict({"model": {"family": "minicpmv2_6"}, "deepspeed": {"zero_stage": 3},
                      "trainable": {"llm": "frozen"}}, check_paths=False)


def test_auto_never_picks_zero3_for_v4_with_a_frozen_llm(tiny46):
    from raytune_minicpmv.train.engine_plan import MicroBatch, choose, model_size

    for llm, fallback in (("frozen", 2), ("lora", 3)):
        cfg = config_from_dict({"model": {"family": "minicpmv4_6", "path": str(tiny46)},
                                "deepspeed": {"zero_stage": "auto"}, "trainable": {"llm": llm}}, check_paths=False)
        plan = choose(cfg, model_size(cfg), MicroBatch(llm_tokens=512, crops=10), world=2, capacity_bytes=1)
        assert plan.stage == fallback and not plan.fits  # nothing fits 1 byte: the fallback is the largest allowed


def test_the_package_imports_and_runs_2x_on_a_transformers_without_the_4x_classes(tmp_path):
    """The GPU machine's transformers 5.17 has MiniCPM-V 4.6 but not 4.7 (>= 5.18): importing the package there
    raised ImportError for everything, 2.6 included. Now only the missing family is refused, saying why."""
    import subprocess
    import sys

    code = (
        "import sys, transformers\n"
        "sys.modules['transformers.models.minicpmv4_7'] = None  # as if this release did not ship 4.7\n"
        "for n in ('MiniCPMV4_7Config', 'MiniCPMV4_7ForConditionalGeneration', 'MiniCPMV4_7Processor'):\n"
        "    transformers.__dict__.pop(n, None)\n"
        "from raytune_minicpmv.models import build_tiny, load_model\n"
        "from raytune_minicpmv.models.registry import FAMILIES, get_family\n"
        f"model = load_model(build_tiny('minicpmv2_6', {str(tmp_path / 'm')!r}))\n"
        "print('2.6 ok', type(model).__name__)\n"
        "print('4.6', FAMILIES['minicpmv4_6'].blocked)\n"
        "print('4.7', FAMILIES['minicpmv4_7'].blocked)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2.6 ok MiniCPMV26" in out.stdout
    assert "4.6 None" in out.stdout
    assert "4.7 needs transformers >= 5.19 (installed: " in out.stdout and "does not ship MiniCPMV4_7Config" in out.stdout


def test_a_transformers_with_the_uniform_crop_merger_is_refused_for_4x_with_the_reason():
    """transformers 5.7-5.18's 4.x ViT merger reshapes all crops of a micro-batch as if each had the first one's
    size: a sliced image fails with a shape error deep in the forward (seen on the GPU machine's 5.17)."""
    from raytune_minicpmv.models.registry import _v4_blocked

    assert "whose vision merger assumes every crop of a micro-batch has one size" in _v4_blocked(
        "MiniCPMV4_6Config", "5.17.0")
    assert "needs transformers >= 5.19 (installed: 5.18.0" in _v4_blocked("MiniCPMV4_6Config", "5.18.0")
    assert _v4_blocked("MiniCPMV4_6Config", "5.19.0") is None and _v4_blocked("MiniCPMV4_7Config", "5.24.0") is None


def test_config_validation_refuses_a_4x_family_this_transformers_cannot_run(monkeypatch):
    """On transformers 5.17 `validate` accepted a 4.6 config that then failed with a shape error in the first
    forward; the family's reason is listed up front with the fix."""
    import dataclasses

    blocked = "needs transformers >= 5.19 (installed: 5.17.0, whose vision merger assumes ...)"
    monkeypatch.setitem(FAMILIES, "minicpmv4_6", dataclasses.replace(FAMILIES["minicpmv4_6"], blocked=blocked))
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": {"family": "minicpmv4_6"}}, check_paths=False)
    assert f"model.family: minicpmv4_6 {blocked}; pip install -U 'transformers>=5.19'" in str(e.value)
    assert not any(p.startswith("model.family") for p in validate(
        config_from_dict({"model": {"family": "minicpmv4_7"}}, check_paths=False), check_paths=False))
