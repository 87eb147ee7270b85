"""Checkpoint compatibility of the native model: official key names, strict loading, round trips, family detection.

Run: pytest tests/unit/models/test_model_checkpoint.py   (a few seconds)
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from raytune_minicpmv.models import (CheckpointError, MiniCPMV26, MiniCPMV25Config, MiniCPMV26Config, build_tiny,
                                     detect_family, get_family, load_model)

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "configs"


@pytest.fixture(scope="module")
def tiny26(tmp_path_factory) -> Path:
    return build_tiny("minicpmv2_6", tmp_path_factory.mktemp("tiny26"))


def official_keys(n_llm: int, n_vision: int) -> set[str]:
    """Every key facts §9.6 lists for MiniCPM-V 2.6 (Qwen2 LLM: q/k/v biases; untied lm_head; no pos_embed)."""
    keys = {"llm.model.embed_tokens.weight", "llm.model.norm.weight", "llm.lm_head.weight",
            "vpm.embeddings.patch_embedding.weight", "vpm.embeddings.patch_embedding.bias",
            "vpm.embeddings.position_embedding.weight", "vpm.post_layernorm.weight", "vpm.post_layernorm.bias",
            "resampler.query", "resampler.kv_proj.weight", "resampler.attn.in_proj_weight",
            "resampler.attn.in_proj_bias", "resampler.attn.out_proj.weight", "resampler.attn.out_proj.bias",
            "resampler.proj"}
    keys |= {f"resampler.{ln}.{p}" for ln in ("ln_q", "ln_kv", "ln_post") for p in ("weight", "bias")}
    for i in range(n_llm):
        pre = f"llm.model.layers.{i}."
        keys |= {f"{pre}self_attn.{x}_proj.weight" for x in "qkvo"}
        keys |= {f"{pre}self_attn.{x}_proj.bias" for x in "qkv"}
        keys |= {f"{pre}mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        keys |= {f"{pre}input_layernorm.weight", f"{pre}post_attention_layernorm.weight"}
    for i in range(n_vision):
        pre = f"vpm.encoder.layers.{i}."
        keys |= {f"{pre}self_attn.{x}_proj.{p}" for x in ("q", "k", "v", "out") for p in ("weight", "bias")}
        keys |= {f"{pre}{m}.{p}" for m in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
                 for p in ("weight", "bias")}
    return keys


def test_tiny_26_keys_match_official_list(tiny26):
    saved = load_file(str(tiny26 / "model.safetensors"))
    assert set(saved) == official_keys(n_llm=2, n_vision=2)
    assert saved["vpm.embeddings.position_embedding.weight"].shape[0] == 4900  # the 70x70 NaViT table
    assert saved["vpm.embeddings.patch_embedding.weight"].shape[1:] == (3, 14, 14)
    cfg = json.loads((tiny26 / "config.json").read_text())
    assert cfg["model_type"] == "raytune_minicpmv2_6" and cfg["drop_vision_last_layer"] is False
    for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        assert (tiny26 / f).is_file(), f


def test_save_load_round_trip_is_bit_exact(tiny26, tmp_path):
    model = load_model(tiny26, dtype=torch.float32)
    model.save_pretrained(str(tmp_path / "again"))
    a, b = load_file(str(tiny26 / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # Plain from_pretrained of our class, and AutoModel (registered under our model_type), load it too.
    from transformers import AutoModel

    for m in (MiniCPMV26.from_pretrained(str(tmp_path / "again")), AutoModel.from_pretrained(str(tmp_path / "again"))):
        assert isinstance(m, MiniCPMV26)
        assert all(torch.equal(a[k], v) for k, v in m.state_dict().items() if k in a)


def test_non_persistent_pos_embed_is_rebuilt_on_load(tiny26):
    from raytune_minicpmv.models.resampler import sincos_2d

    model = load_model(tiny26, dtype=torch.float32)
    assert "resampler.pos_embed" not in model.state_dict()
    assert torch.equal(model.resampler.pos_embed, sincos_2d(model.config.hidden_size, 70, 70))


def test_sharded_safetensors_and_bin(tiny26, tmp_path):
    ref = load_file(str(tiny26 / "model.safetensors"))
    model = load_model(tiny26, dtype=torch.float32)
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="300KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    # .bin layout: same config, one torch.save'd state dict
    (tmp_path / "bin").mkdir()
    shutil.copy(tiny26 / "config.json", tmp_path / "bin" / "config.json")
    torch.save(ref, tmp_path / "bin" / "pytorch_model.bin")
    for d in ("sharded", "bin"):
        sd = load_model(tmp_path / d, dtype=torch.float32).state_dict()
        assert all(torch.equal(ref[k], sd[k]) for k in ref), d


def test_strict_loading_lists_every_bad_key(tiny26, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny26, bad)
    sd = load_file(str(bad / "model.safetensors"))
    del sd["resampler.proj"]
    sd["vpm.encoder.layers.7.mlp.fc1.weight"] = torch.zeros(2, 2)
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_model(bad, dtype=torch.float32)
    assert "resampler.proj" in str(e.value) and "vpm.encoder.layers.7.mlp.fc1.weight" in str(e.value)


def test_remote_code_config_loads_natively_without_trust_remote_code(tiny26, tmp_path, caplog):
    """A real 2.6 config.json (model_type minicpmv + auto_map, version 2.6) goes to our class, no remote code."""
    real = tmp_path / "real_layout"
    shutil.copytree(tiny26, real)
    cfg = json.loads((real / "config.json").read_text())
    cfg.update(model_type="minicpmv", architectures=["MiniCPMV"], version=2.6,
               auto_map={"AutoConfig": "configuration_minicpm.MiniCPMVConfig",
                         "AutoModel": "modeling_minicpmv.MiniCPMV"})
    del cfg["drop_vision_last_layer"]  # the class default (true) then drops the last vision layer, with a warning
    (real / "config.json").write_text(json.dumps(cfg))
    assert get_family(real).name == "minicpmv2_6"
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError) as e:
        load_model(real, dtype=torch.float32)
    assert "drop_vision_last_layer" in caplog.text
    assert "vpm.encoder.layers.1." in str(e.value) and "1 vision layers" in str(e.value)
    cfg["drop_vision_last_layer"] = False
    (real / "config.json").write_text(json.dumps(cfg))
    model = load_model(real, dtype=torch.float32)
    assert len(model.vpm.encoder.layers) == 2


def test_unknown_and_blocked_families_need_trust_remote_code(tmp_path):
    (tmp_path / "qwen").mkdir()
    shutil.copy(ASSETS / "minicpmv26_config" / "config.json", tmp_path / "qwen" / "config.json")  # LLM part only
    (tmp_path / "v20").mkdir()
    shutil.copy(ASSETS / "minicpmv20_config" / "config.json", tmp_path / "v20" / "config.json")
    with pytest.raises(CheckpointError, match="trust_remote_code"):
        load_model(tmp_path / "qwen")
    with pytest.raises(CheckpointError, match="timm"):
        load_model(tmp_path / "v20")
    assert detect_family(json.loads((tmp_path / "v20" / "config.json").read_text())) == "minicpmv2_0"
    with pytest.raises(NotImplementedError, match="timm"):
        build_tiny("minicpmv2_0", tmp_path / "x")


def test_real_25_config_parses():
    raw = json.loads((ASSETS / "minicpmv25_config" / "config.json").read_text())
    assert detect_family(raw) == "minicpmv2_5"
    cfg = MiniCPMV25Config.from_checkpoint_dict(raw)
    assert (cfg.query_num, cfg.vision_layers, cfg.use_image_id, cfg.slice_config["max_slice_nums"]) == (96, 27, False, 9)
    llm = cfg.llm_config()
    assert type(llm).__name__ == "LlamaConfig"
    assert (llm.hidden_size, llm.num_key_value_heads, llm.vocab_size) == (4096, 8, 128256)
    assert llm.rope_parameters["rope_theta"] == 500000.0


def test_26_class_defaults_on_llm_only_config():
    """The vendored 2.6 config is the LLM part; the multimodal fields fall back to the class defaults (§9.2)."""
    raw = json.loads((ASSETS / "minicpmv26_config" / "config.json").read_text())
    cfg = MiniCPMV26Config.from_checkpoint_dict(raw)
    assert (cfg.query_num, cfg.use_image_id, cfg.vision_batch_size, cfg.drop_vision_last_layer) == (64, True, 16, True)
    assert cfg.vision_config["num_hidden_layers"] == 27 and cfg.vision_layers == 26
    assert cfg.slice_config == {"patch_size": 14, "max_slice_nums": 1, "scale_resolution": 448}
    assert cfg.llm_config().rope_parameters["rope_theta"] == 1e6


def test_build_tiny_real_dims_args(tmp_path):
    # Real 2.6 vision + resampler dims with a reduced LLM: checks the arguments resolve (weights not loaded back).
    from raytune_minicpmv.models.tiny import _config_fields

    f = _config_fields("minicpmv2_6", "real", "tiny", dict(
        llm_hidden=1536, llm_layers=3, llm_heads=None, llm_kv_heads=None, llm_intermediate=None, vision_hidden=None,
        vision_layers=None, vision_heads=None, vision_intermediate=None, query_num=None, vocab_size=151666,
        max_slice_nums=9, vision_batch_size=16), tokenizer_len=1563)
    assert f["vision_config"]["hidden_size"] == 1152 and f["vision_config"]["num_hidden_layers"] == 27
    assert (f["hidden_size"], f["num_hidden_layers"], f["num_attention_heads"], f["vocab_size"]) == (1536, 3, 12, 151666)
    assert f["num_attention_heads"] % f["num_key_value_heads"] == 0
