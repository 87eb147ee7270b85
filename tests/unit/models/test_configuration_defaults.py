"""The model config's defaults and derived configs when a config.json leaves fields out (the remote-code class
defaults, facts §9.2), and what of a checkpoint dict is kept, dropped or relabelled.

Found by mutation testing (docs/TESTING.md): the real 2.5 / 2.6 files name almost every field, so the defaults
behind `vision_config_hf` (image size, layer-norm eps, activation) and several `__init__` defaults were never
read by a test.

Run: pytest tests/unit/models/test_configuration_defaults.py   (~1 s)
"""
from __future__ import annotations

import logging

import pytest

from raytune_minicpmv.models.configuration import (DEFAULT_VISION_CONFIG, MiniCPMV25Config, MiniCPMV26Config,
                                                   MiniCPMVConfig)

SMALL_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
                "patch_size": 14}  # no image_size, layer_norm_eps or hidden_act


def test_class_defaults_of_the_multimodal_fields():
    cfg = MiniCPMV26Config()
    assert (cfg.query_num, cfg.image_size, cfg.drop_vision_last_layer, cfg.batch_vision_input, cfg.use_image_id,
            cfg.vision_batch_size, cfg.slice_mode, cfg.version) == (64, 448, True, True, True, 16, True, None)
    assert cfg.slice_config == {"patch_size": 14, "max_slice_nums": 1, "scale_resolution": 448}  # no slicing
    assert cfg.vision_config == DEFAULT_VISION_CONFIG
    old = MiniCPMV25Config()
    assert (old.query_num, old.use_image_id) == (96, False)
    assert MiniCPMV26Config(query_num=16, batch_vision_input=False).query_num == 16


def test_a_given_slice_config_is_merged_over_the_defaults_without_its_model_type():
    cfg = MiniCPMV26Config(slice_config={"max_slice_nums": 9, "model_type": "minicpmv"})
    assert cfg.slice_config == {"patch_size": 14, "max_slice_nums": 9, "scale_resolution": 448}


def test_remote_code_pointers_are_dropped_and_other_architectures_kept():
    cfg = MiniCPMV26Config(auto_map={"AutoModel": "modeling_minicpmv.MiniCPMV"}, architectures=["MiniCPMV"])
    saved = cfg.to_dict()
    assert "auto_map" not in saved and saved.get("architectures") is None
    assert MiniCPMV26Config(architectures=["MiniCPMV26"]).architectures == ["MiniCPMV26"]


def test_a_top_level_patch_size_is_the_vision_patch_size():
    assert MiniCPMV26Config(patch_size=16, vision_config=SMALL_VISION | {"patch_size": 16}).patch_size == 16
    assert MiniCPMV26Config(patch_size=16, vision_config={"hidden_size": 32}).vision_config["patch_size"] == 16
    assert MiniCPMV26Config(vision_config=SMALL_VISION).patch_size == 14


def test_vision_config_defaults_for_fields_the_checkpoint_leaves_out():
    hf = MiniCPMV26Config(vision_config=SMALL_VISION).vision_config_hf()
    assert (hf.image_size, hf.layer_norm_eps, hf.hidden_act) == (980, 1e-6, "gelu_pytorch_tanh")
    assert (hf.hidden_size, hf.intermediate_size, hf.num_attention_heads, hf.patch_size) == (32, 64, 2, 14)
    assert hf.num_hidden_layers == 2  # drop_vision_last_layer (class default True)
    assert hf._attn_implementation == "sdpa"


def test_vision_config_values_the_checkpoint_gives_are_used():
    given = SMALL_VISION | {"image_size": 448, "layer_norm_eps": 1e-5, "hidden_act": "gelu"}
    cfg = MiniCPMV26Config(vision_config=given, drop_vision_last_layer=False, attn_implementation="eager")
    hf = cfg.vision_config_hf()
    assert (hf.image_size, hf.layer_norm_eps, hf.hidden_act, hf.num_hidden_layers) == (448, 1e-5, "gelu", 3)
    assert hf._attn_implementation == "eager"
    assert cfg.llm_config()._attn_implementation == "eager"


def test_the_llm_config_has_the_flat_llm_fields_and_none_of_the_multimodal_ones():
    cfg = MiniCPMV26Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
                           query_num=16, vision_config=SMALL_VISION, auto_map={"x": "y"})
    llm = cfg.llm_config()
    assert type(llm).__name__ == "Qwen2Config"
    assert (llm.hidden_size, llm.num_hidden_layers, llm.num_attention_heads, llm.vocab_size) == (48, 2, 4, 300)
    assert llm._attn_implementation == "sdpa"
    for key in ("query_num", "vision_config", "slice_config", "use_image_id", "vision_batch_size"):
        assert not hasattr(llm, key), key
    assert type(MiniCPMV25Config(hidden_size=48, num_attention_heads=4).llm_config()).__name__ == "LlamaConfig"


def test_from_checkpoint_dict_drops_bookkeeping_keys_and_warns_about_a_missing_drop_flag(caplog):
    raw = {"model_type": "minicpmv", "transformers_version": "4.40.0", "_name_or_path": "openbmb/x",
           "query_num": 16, "hidden_size": 48}
    with caplog.at_level(logging.WARNING, logger="raytune_minicpmv.models.configuration"):
        cfg = MiniCPMV26Config.from_checkpoint_dict(raw)
    assert "no drop_vision_last_layer" in caplog.text
    assert cfg.model_type == "raytune_minicpmv2_6" and cfg.query_num == 16 and cfg.drop_vision_last_layer is True
    assert getattr(cfg, "_name_or_path", "") != "openbmb/x"
    assert raw["model_type"] == "minicpmv"  # the caller's dict is not changed
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="raytune_minicpmv.models.configuration"):
        MiniCPMV26Config.from_checkpoint_dict({"drop_vision_last_layer": False})
    assert caplog.text == ""


@pytest.mark.parametrize("model_type", ["minicpmv", "raytune_minicpmv2_6"])
def test_from_pretrained_reads_a_published_or_our_config(tmp_path, model_type):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "query_num": 16,
                                                      "drop_vision_last_layer": False}))
    cfg = MiniCPMV26Config.from_pretrained(tmp_path)
    assert isinstance(cfg, MiniCPMVConfig) and cfg.query_num == 16 and cfg.drop_vision_last_layer is False
    assert MiniCPMV26Config.get_config_dict(str(tmp_path))[0]["model_type"] == "raytune_minicpmv2_6"
