"""Every key of the real MiniCPM-V 2.6 / 2.5 config.json through every config entry point (issue 9, defect 1).

PEFT's adapter save calls `model.config.__class__.from_pretrained(base_dir)`: with the published 2.6 config.json
the top-level `patch_size` hit a read-only property (`AttributeError: property 'patch_size' of 'MiniCPMV26Config'
object has no setter`) and every LoRA run died at its first checkpoint. Here each key of the real files must come
through `from_pretrained`, `from_checkpoint_dict` and save -> reload with its value, or be one of the documented
transformations below.
"""
import json
import shutil
from pathlib import Path

import pytest

from raytune_minicpmv.models import MiniCPMV25Config, MiniCPMV26Config

ASSETS = Path(__file__).resolve().parents[2] / "assets"
REAL = {"2.6": (MiniCPMV26Config, ASSETS / "minicpmv26_hf_layout"),
        "2.5": (MiniCPMV25Config, ASSETS / "configs" / "minicpmv25_config")}


def _kept_elsewhere(cfg, raw: dict) -> dict:
    """Keys of the real file that are not stored under their own name, with where their value went."""
    llm = cfg.llm_config()
    return {
        "patch_size": cfg.vision_config["patch_size"],  # one source of truth (the property reads it back)
        "torch_dtype": str(cfg.dtype).removeprefix("torch."),  # transformers 5 renamed it `dtype`
        "rope_theta": llm.rope_parameters["rope_theta"],  # transformers 5: rope_parameters
        "rope_scaling": None if llm.rope_parameters["rope_type"] == "default" else "set",
        # every given sub-key kept (the class adds the remote-code default scale_resolution 448); the
        # sub-dict's own model_type tag is dropped
        "slice_config": {**{k: cfg.slice_config[k] for k in raw["slice_config"] if k != "model_type"},
                         "model_type": raw["slice_config"]["model_type"]},
    }


# Keys that name the remote code or the file's origin, not model values: deliberately not kept (a config we save
# must not point AutoModel at remote code written for another class); `use_cache` is a generation parameter
# transformers itself drops from every model config.
NOT_KEPT = {"auto_map", "architectures", "model_type", "transformers_version", "_name_or_path", "use_cache"}


@pytest.mark.parametrize("version", REAL)
def test_every_real_key_survives_from_pretrained(version):
    cls, folder = REAL[version]
    raw = json.loads((folder / "config.json").read_text())
    cfg = cls.from_pretrained(folder)  # the call PEFT makes on the base dir when saving an adapter
    stored, elsewhere = cfg.to_dict(), _kept_elsewhere(cfg, raw)
    for key, value in raw.items():
        if key in NOT_KEPT:
            continue
        got = elsewhere[key] if key in elsewhere else stored.get(key, "<missing>")
        assert got == value, f"{version} config.json key {key!r}: {value!r} came back as {got!r}"
    assert cfg.model_type == cls.model_type and not hasattr(cfg, "auto_map")
    assert cfg.patch_size == raw["patch_size"] and cfg.query_num == raw["query_num"]


@pytest.mark.parametrize("version", REAL)
def test_from_checkpoint_dict_equals_from_pretrained(version):
    cls, folder = REAL[version]
    a = cls.from_pretrained(folder).to_dict()
    b = cls.from_checkpoint_dict(json.loads((folder / "config.json").read_text())).to_dict()
    a.pop("_name_or_path"), b.pop("_name_or_path")  # provenance only: from_pretrained keeps the file's value
    assert a == b


@pytest.mark.parametrize("version", REAL)
def test_save_and_reload_keeps_every_value(version, tmp_path):
    cls, folder = REAL[version]
    cfg = cls.from_pretrained(folder)
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == cls.model_type and "auto_map" not in saved
    for again in (cls.from_pretrained(tmp_path), cls.from_checkpoint_dict(saved)):
        a, b = cfg.to_dict(), again.to_dict()
        for d in (a, b):
            d.pop("_name_or_path"), d.pop("transformers_version")
        assert a == b
        assert again.llm_config().to_dict() == cfg.llm_config().to_dict()
        assert again.vision_config_hf().to_dict() == cfg.vision_config_hf().to_dict()


def test_conflicting_patch_sizes_are_an_error(tmp_path):
    raw = json.loads((REAL["2.6"][1] / "config.json").read_text())
    raw["patch_size"] = 16
    with pytest.raises(ValueError, match="patch_size 16 differs from vision_config.patch_size 14"):
        MiniCPMV26Config.from_checkpoint_dict(raw)


def test_2_0_style_top_level_patch_size_only():
    cfg = MiniCPMV26Config.from_checkpoint_dict({"patch_size": 16, "vision_config": {"model_type": "siglip"}})
    assert cfg.patch_size == 16 and cfg.vision_config["patch_size"] == 16
