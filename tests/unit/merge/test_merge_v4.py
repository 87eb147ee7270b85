"""The merge of a MiniCPM-V 4.6 / 4.7 LoRA adapter (+ trained connector copies), without Ray: the merged folder
loads in a FRESH interpreter with plain `AutoModelForImageTextToText.from_pretrained` (raytune_minicpmv never
imported there) and reproduces the adapter-on-base logits on a real sample batch (images, the folder's processor).

The adapter is made as the train stage makes it: `apply_trainable_policy` (default 4.x LoRA targets, the connector
fully trained), random non-zero weights standing in for training, saved with `save_adapter`.
Needs the 4.x data stage (branch i13data) for the sample batch. Run: pytest tests/unit/merge/test_merge_v4.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from raytune_minicpmv.config import LoraConfig, MergeConfig, TrainableConfig
from raytune_minicpmv.merge.merger import MANIFEST, merge_adapter
from raytune_minicpmv.merge.safetensors_stream import CheckpointReader
from raytune_minicpmv.models import apply_trainable_policy, load_model
from raytune_minicpmv.models.adapter_files import save_adapter

pytestmark = pytest.mark.slow  # ~50 s per family on 2 busy cores (three model loads, a subprocess, the merge check)


def _adapter(base, out):
    model = apply_trainable_policy(load_model(base, dtype=torch.float32), TrainableConfig(),
                                   LoraConfig(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # lora_B starts at zero; move everything trainable as training would
                p.add_(torch.randn_like(p) * 0.05)
    save_adapter(model, out)
    return out


def _fresh_logits(merged, batch_path, out_path):
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForImageTextToText
        model = AutoModelForImageTextToText.from_pretrained({str(merged)!r}, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(**torch.load({str(batch_path)!r}), use_cache=False).logits
        torch.save({{"logits": logits, "cls": type(model).__name__}}, {str(out_path)!r})
        assert not [m for m in sys.modules if m.startswith("raytune_minicpmv")]
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=str(out_path.parent), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out_path)


@pytest.mark.parametrize("family,cls", [
    ("minicpmv4_6", "MiniCPMV4_6ForConditionalGeneration"),
    pytest.param("minicpmv4_7", "MiniCPMV4_7ForConditionalGeneration", marks=pytest.mark.long)])
def test_merged_v4_loads_in_plain_transformers_and_matches_adapter_on_base(family, cls, request, tmp_path):
    from peft import PeftModel

    from raytune_minicpmv.data.pipeline import preprocess_for_check
    from raytune_minicpmv.data.sample_data import write_sample_dataset

    base = request.getfixturevalue("tiny46" if family == "minicpmv4_6" else "tiny47")
    adapter = _adapter(base, tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["auto_mapping"]["base_model_class"] == \
        "AutoModelForImageTextToText"
    merged = merge_adapter(base, adapter, tmp_path / "merged", MergeConfig(dtype="fp32", verify_samples=1))
    verification = json.loads((merged / MANIFEST).read_text())["verification"]
    assert verification["max_abs_diff"] <= verification["atol"] < 1e-2 < verification["adapter_effect"]
    reader = CheckpointReader(merged)
    assert "lm_head.weight" not in set(reader.keys())  # the tied head stays one tensor, as in the base
    key = "model.merger.mlp.0.linear_1.weight"  # the trained connector copy replaced the base tensor
    assert not torch.equal(reader.get(key), CheckpointReader(base).get(key))

    data = write_sample_dataset(tmp_path / "data", split="eval")
    batch = preprocess_for_check(merged, data, index=2)
    assert "pixel_values" in batch
    batch_path = tmp_path / "batch.pt"
    torch.save({k: v for k, v in batch.items() if k not in ("labels", "num_images")}, batch_path)
    fresh = _fresh_logits(merged, batch_path, tmp_path / "fresh.pt")
    assert fresh["cls"] == cls
    reference = PeftModel.from_pretrained(load_model(base, dtype=torch.float32), str(adapter)).eval()
    with torch.no_grad():
        want = reference(**torch.load(batch_path), use_cache=False).logits
        plain_base = load_model(base, dtype=torch.float32).eval()(**torch.load(batch_path), use_cache=False).logits
    assert (want - fresh["logits"]).abs().max() <= 1e-4
    assert (want - plain_base).abs().max() > 1e-2  # the adapter matters
