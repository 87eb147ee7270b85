"""Saving a PEFT adapter that loads without this package (the training checkpoint's `adapter/` directory).

    from raytune_minicpmv.models.adapter_files import save_adapter
    save_adapter(peft_model, "ckpt/adapter", state_dict=gathered)   # PEFT layout, portable auto_mapping
"""
from __future__ import annotations

import json
from pathlib import Path

# What AutoPeftModel imports to build the base: transformers' own AutoModel (in PEFT's import allowlist), which with
# trust_remote_code=True builds the official model from the base's config.json auto_map. PEFT would write our class
# (`raytune_minicpmv.models.modeling.MiniCPMV26`), which AutoPeftModel refuses to import without this package.
PORTABLE_AUTO_MAPPING = {"base_model_class": "AutoModel", "parent_library": "transformers"}


def save_adapter(peft_model, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """`peft_model.save_pretrained` (PEFT layout, safetensors), with an `auto_mapping` that names no class of ours."""
    out_dir = Path(out_dir)
    peft_model.save_pretrained(str(out_dir), state_dict=state_dict, safe_serialization=True)
    path = out_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    if cfg.get("task_type") is None:  # PEFT only writes auto_mapping without a task type (ours: none, as official)
        cfg["auto_mapping"] = dict(PORTABLE_AUTO_MAPPING)
        if _hf_native(peft_model):  # 4.6 / 4.7: transformers' own class with the LM head, no remote code
            cfg["auto_mapping"]["base_model_class"] = "AutoModelForImageTextToText"
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out_dir


def _hf_native(peft_model) -> bool:
    from .registry import FAMILIES, family_of_model

    name = family_of_model(peft_model)
    return bool(name) and FAMILIES[name].hf_native
