"""The published-layout fixtures themselves, and the no-Ray paths on them (issue 9: defects 1, 8, 10).

`published26` / `published25` (tests/conftest.py) are tiny random-weight checkpoints laid out like the folders
users download; see raytune_minicpmv/models/published.py.
"""
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from raytune_minicpmv.config import load_config
from raytune_minicpmv.models import CheckpointError, apply_trainable_policy, load_model, load_model_for

ROOT = Path(__file__).resolve().parents[3]
ASSETS = ROOT / "tests" / "assets"
SIZE_KEYS = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "max_window_layers", "torch_dtype"}


def lora_recipe(model_path, *overrides):
    """The shipped LoRA seed recipe (configs/minicpmv26_lora.yaml) pointed at a local checkpoint."""
    return load_config(ROOT / "configs" / "minicpmv26_lora.yaml", [f"model.path={model_path}", *overrides],
                       check_paths=False)


@pytest.mark.parametrize("fixture, source", [("published26", ASSETS / "minicpmv26_hf_layout"),
                                             ("published25", ASSETS / "configs" / "minicpmv25_config")])
def test_layout_is_the_published_one_with_only_sizes_shrunk(fixture, source, request):
    ckpt = request.getfixturevalue(fixture)
    real, ours = (json.loads((d / "config.json").read_text()) for d in (source, ckpt))
    assert list(ours) == list(real)  # same keys, same order
    assert {k for k in real if real[k] != ours[k]} <= SIZE_KEYS | {"vision_config"}
    assert {k for k in real["vision_config"] if real["vision_config"][k] != ours["vision_config"][k]} == \
        {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"}
    for name in ("preprocessor_config.json", "generation_config.json"):
        assert (ckpt / name).read_bytes() == (source / name).read_bytes()
    tok_cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "MiniCPMVTokenizerFast" and "auto_map" in tok_cfg
    for py in ("configuration_minicpm.py", "modeling_minicpmv.py", "tokenization_minicpmv_fast.py",
               "processing_minicpmv.py", "image_processing_minicpmv.py"):
        assert (ckpt / py).is_file() and (ckpt / py).stat().st_size == 0  # placeholders, no code
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((ckpt / s).is_file() for s in shards)
    assert {k.split(".")[0] for k in index["weight_map"]} == {"llm", "vpm", "resampler"}
    with safe_open(str(ckpt / shards[0]), "pt") as f:
        assert f.get_slice(next(iter(f.keys()))).get_dtype() == "BF16"


def test_26_fixture_keeps_the_real_tokenizer_and_vocab(published26):
    assert (published26 / "tokenizer_config.json").read_bytes() == \
        (ASSETS / "minicpmv26_hf_layout" / "tokenizer_config.json").read_bytes()  # the ORIGINAL file
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "added_tokens.json", "special_tokens_map.json"):
        assert (published26 / name).read_bytes() == (ASSETS / "minicpmv26_tokenizer" / name).read_bytes()
    model = load_model(published26, dtype=torch.float32)  # strict: every key present, none extra
    assert model.get_input_embeddings().weight.shape[0] == 151666
    assert model.config.patch_size == 14 and model.config.query_num == 64 and model.config.vision_layers == 2


@pytest.mark.parametrize("fixture", ["published26", "published25"])
def test_lora_seed_recipe_adapter_saves_on_a_published_base(fixture, request, tmp_path):
    """Defect 1: PEFT's save calls MiniCPMV26Config.from_pretrained(base): the top-level patch_size crashed it."""
    from raytune_minicpmv.models.adapter_files import save_adapter

    ckpt = request.getfixturevalue(fixture)
    cfg = lora_recipe(ckpt, "lora.r=4", "lora.alpha=8")
    model = apply_trainable_policy(load_model_for(cfg.model, torch.float32), cfg.trainable, cfg.lora)
    save_adapter(model, tmp_path / "adapter")
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(ckpt)
    assert set(adapter_cfg["modules_to_save"]) == {"resampler", "vpm"}  # the seed recipe: vision + resampler full
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 0


def test_adapter_config_names_no_class_of_ours(published26, tmp_path):
    """Defect 8: PEFT writes auto_mapping = our class; AutoPeftModel then refuses it (not in its import allowlist)."""
    from raytune_minicpmv.models.adapter_files import save_adapter

    cfg = lora_recipe(published26, "lora.r=4", "trainable.vision=frozen")
    save_adapter(apply_trainable_policy(load_model(published26, torch.float32), cfg.trainable, cfg.lora),
                 tmp_path / "adapter")
    text = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert "raytune" not in text.lower() and "MiniCPMV26" not in text
    assert json.loads(text)["auto_mapping"] == {"base_model_class": "AutoModel", "parent_library": "transformers"}
    assert json.loads(text)["task_type"] is None
    # AutoPeftModel in a fresh interpreter (no import of this package): it must get past the adapter's class lookup
    # to the base checkpoint's own remote code. That code is not available here (the fixture's .py files are empty
    # placeholders), so the load ends where transformers imports configuration_minicpm.py — not at the allowlist.
    probe = ("import sys\nfrom peft import AutoPeftModel\n"
             f"try:\n    AutoPeftModel.from_pretrained({str(tmp_path / 'adapter')!r}, trust_remote_code=True)\n"
             "except Exception as e:\n    print('ERROR', type(e).__name__, e)\n"
             "print('OURS_IMPORTED', any(m.startswith('raytune_minicpmv') for m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, cwd=tmp_path).stdout
    assert "OURS_IMPORTED False" in out, out
    assert "allowlist" not in out, out
    assert "MiniCPMVConfig" in out or "configuration_minicpm" in out, out


def test_2_0_without_trust_remote_code_names_the_flag(tmp_path):
    """Defect 10: the flag is documented; without it a 2.0 checkpoint is one clear error naming it."""
    ckpt = shutil.copytree(ASSETS / "configs" / "minicpmv20_config", tmp_path / "MiniCPM-V-2")
    cfg = lora_recipe(ckpt, "model.family=minicpmv2_0", "data.llm_type=minicpm")
    with pytest.raises(CheckpointError, match=r"family minicpmv2_0: not implemented natively.*"
                                              r"Set model\.trust_remote_code=true"):
        load_model_for(cfg.model)


def test_2_0_with_trust_remote_code_takes_the_remote_code_path(tmp_path, caplog, monkeypatch):
    """Defect 10: `model.trust_remote_code: true` reaches the loader, which warns and runs AutoModel with
    trust_remote_code=True. The checkpoint's code is not available offline, so the attempt ends where transformers
    looks for configuration_minicpm.py (the auto_map target) — wrapped in a CheckpointError naming the path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = shutil.copytree(ASSETS / "configs" / "minicpmv20_config", tmp_path / "MiniCPM-V-2")
    cfg = lora_recipe(ckpt, "model.family=minicpmv2_0", "data.llm_type=minicpm", "model.trust_remote_code=true")
    with caplog.at_level(logging.WARNING, logger="raytune_minicpmv.models.registry"), \
            pytest.raises(CheckpointError, match=r"own code \(model\.trust_remote_code=true\) failed") as err:
        load_model_for(cfg.model)
    assert "configuration_minicpm" in str(err.value), err.value
    assert any("trust_remote_code=True" in r.getMessage() and str(ckpt) in r.getMessage() for r in caplog.records)
