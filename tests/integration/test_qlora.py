"""QLoRA end to end on CPU: a tiny MiniCPM-V 2.6 whose LLM linears are NF4 (bitsandbytes' CPU backend), LoRA on top,
3 steps of Ray Train on 2 CPU workers (DeepSpeed ZeRO-2), the adapter saved, then merged and verified twice: into
the bf16 base the user names, and into a quantized-only base (dequantized first).

    flock /tmp/raytest.lock timeout 900 .venv/bin/python -m pytest tests/integration/test_qlora.py -q
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from raytune_minicpmv.config import MergeConfig, load_config

pytestmark = [pytest.mark.slow, pytest.mark.long]  # ~60-80 s quiet (Ray workers + NF4 load); CI runs it (make test-all)
bnb = pytest.importorskip("bitsandbytes")
DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, ray_session):
    """3 QLoRA steps; one micro-batch of 10 rows per rank is the whole 20-row split, so every step sees all of it."""
    from raytune_minicpmv.data.sample_data import write_sample_dataset
    from raytune_minicpmv.models import build_tiny
    from raytune_minicpmv.train.trainer import run_train

    root = tmp_path_factory.mktemp("qlora")
    overrides = {"model.path": build_tiny("minicpmv2_6", root / "model"),
                 "data.train_path": write_sample_dataset(root / "data", "train"),
                 "data.eval_path": write_sample_dataset(root / "data", "eval"),
                 "data.output_path": root / "rows", "run.storage_path": root / "runs", "run.name": "qlora",
                 "model.quantization": "nf4", "deepspeed.zero_stage": 2, "train.max_steps": 3,
                 "train.micro_batch_size": 10, "train.logging_steps": 1, "train.eval_steps": 3,
                 "train.eval_max_batches": 1, "train.save_steps": 3, "optim.warmup_steps": 0, "optim.lr": 5e-3}
    cfg = load_config(DEMO, [f"{k}={v}" for k, v in overrides.items()])
    return cfg, run_train(cfg), root


def test_qlora_trains_under_ray_train_and_saves_an_adapter_of_the_lora_weights_only(qlora_run):
    from safetensors.torch import load_file

    cfg, s, _ = qlora_run
    assert s["error"] is None and s["steps"] == 3
    losses = [loss for _, loss in s["loss_history"]]
    assert losses[2] < losses[0] - 0.05, losses
    saved = load_file(Path(s["checkpoint"]) / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())  # B starts at zero: it trained
    assert any("resampler" in k for k in saved)  # the fully trained (bf16-kept) resampler travels with it
    assert not any("quant" in k or "absmax" in k for k in saved)  # no 4-bit base weight leaks into the adapter
    assert all(v.dtype == torch.float32 for v in saved.values())  # demo's model.dtype


def test_qlora_adapter_merges_into_the_named_bf16_base_and_verifies(qlora_run, tmp_path):
    from raytune_minicpmv.merge.merger import MANIFEST, merge_adapter

    cfg, s, _ = qlora_run
    out = merge_adapter(cfg.model.path, Path(s["checkpoint"]) / "adapter", tmp_path / "merged",
                        MergeConfig(dtype="fp32", verify_samples=2))
    manifest = json.loads((out / MANIFEST).read_text())
    v = manifest["verification"]
    assert manifest["dequantized_base"] is False and v["samples"] == 2 and v["max_abs_diff"] <= v["atol"]
    assert v["adapter_effect"] > 10 * v["atol"]  # the check can see the adapter


def test_qlora_adapter_on_a_quantized_only_base_gives_a_dequantized_merge_that_verifies(qlora_run, tmp_path):
    from raytune_minicpmv.merge.merger import MANIFEST, merge_adapter
    from raytune_minicpmv.models import load_model
    from raytune_minicpmv.models.quantization import quantized_module_names

    cfg, s, root = qlora_run
    quantized = tmp_path / "nf4-base"  # the bf16 tiny saved packed: a base that exists only quantized
    load_model(cfg.model.path, dtype=torch.bfloat16, quantization="nf4").save_pretrained(str(quantized))
    for f in Path(cfg.model.path).iterdir():
        if not (quantized / f.name).exists():
            shutil.copyfile(f, quantized / f.name)  # tokenizer + processor files
    out = merge_adapter(quantized, Path(s["checkpoint"]) / "adapter", tmp_path / "merged",
                        MergeConfig(dtype="bf16", verify_samples=2))
    manifest = json.loads((out / MANIFEST).read_text())
    v = manifest["verification"]
    assert manifest["dequantized_base"] is True and v["max_abs_diff"] <= v["atol"] and v["samples"] == 2
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert quantized_module_names(load_model(out, dtype=torch.bfloat16)) == []  # a plain bf16 checkpoint
    assert not (tmp_path / ".merged.dequantized-base").exists()  # the dequantized copy is cleaned up
