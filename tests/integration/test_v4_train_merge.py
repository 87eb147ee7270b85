"""MiniCPM-V 4.6 / 4.7 through the whole chain on CPU: preprocess (transformers' processor in Ray Data) → Ray Train
2 workers DeepSpeed ZeRO-2 LoRA (ZeRO-3 is refused for 4.x: models.forward.family_supports_zero3) → merge → a fresh interpreter loads the merged folder with plain
`AutoModelForImageTextToText.from_pretrained` (no import of this package) and gives the adapter-on-base logits.

Tiny random checkpoints (build_tiny, tiny 4.x tokenizer); the processor's scale_resolution is lowered to 112 in the
checkpoint's processor_config.json (64 patches per crop) so a CPU step takes about a second.
    flock /tmp/raytest.lock python -m pytest tests/integration/test_v4_train_merge.py -q
Needs the 4.x data stage (branch i13data: preprocessing 4.x records).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from raytune_minicpmv.config import MergeConfig, load_config

pytestmark = pytest.mark.slow
DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _small_crops(ckpt: Path) -> None:
    path = ckpt / "processor_config.json"  # transformers 5 nests the image processor's settings here
    cfg = json.loads(path.read_text())
    cfg["image_processor"]["scale_resolution"] = 112
    path.write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, ray_session):
    """Tiny 4.6 and 4.7 checkpoints, sample data preprocessed once per family."""
    from raytune_minicpmv.data.pipeline import run_preprocess
    from raytune_minicpmv.data.sample_data import write_sample_dataset
    from raytune_minicpmv.models import build_tiny

    root = tmp_path_factory.mktemp("v4")
    data = {"data.train_path": str(write_sample_dataset(root / "data", "train")),
            "data.eval_path": str(write_sample_dataset(root / "data", "eval"))}
    out = {}
    for family in ("minicpmv4_6", "minicpmv4_7"):
        ckpt = build_tiny(family, root / family, max_shard_size="500KB")
        _small_crops(ckpt)
        paths = {**data, "model.family": family, "model.path": str(ckpt), "deepspeed.zero_stage": "2",
                 "data.output_path": str(root / f"rows_{family}"), "run.storage_path": str(root / "runs")}
        run_preprocess(load_config(DEMO, [f"{k}={v}" for k, v in paths.items()]))
        out[family] = {**paths, "data.preprocessed": "true"}
    return out


def config(paths, name, *overrides):
    return load_config(DEMO, [f"{k}={v}" for k, v in paths.items()] + [f"run.name={name}", *overrides])


def _check_batch(merged: Path, data: str, scratch: Path) -> Path:
    """A collated batch of eval records (the data stage, the merged folder's own processor) saved for the subprocess."""
    from raytune_minicpmv.data.pipeline import preprocess_for_check

    batch = preprocess_for_check(merged, data, index=1)
    path = scratch / "batch.pt"
    torch.save({k: v for k, v in batch.items() if k not in ("labels", "num_images")}, path)
    return path


def _fresh_interpreter_logits(merged: Path, batch_path: Path, out: Path) -> None:
    """Plain transformers in a new process: no raytune_minicpmv on the path, none imported."""
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForImageTextToText
        model = AutoModelForImageTextToText.from_pretrained({str(merged)!r}, dtype=torch.float32).eval()
        batch = torch.load({str(batch_path)!r})
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits
        torch.save({{"logits": logits, "cls": type(model).__name__}}, {str(out)!r})
        assert not [m for m in sys.modules if m.startswith("raytune_minicpmv")]
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=str(out.parent), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _adapter_logits(base: str, adapter: Path, batch_path: Path) -> torch.Tensor:
    from peft import PeftModel

    from raytune_minicpmv.models import load_model

    model = PeftModel.from_pretrained(load_model(base, dtype=torch.float32), str(adapter)).eval()
    with torch.no_grad():
        return model(**torch.load(batch_path), use_cache=False).logits


def _merge_and_reload(cfg, summary, tmp_path, expected_cls):
    from raytune_minicpmv.merge.merger import MANIFEST, merge_adapter

    adapter = Path(summary["checkpoint"]) / "adapter"
    merged = merge_adapter(cfg.model.path, adapter, tmp_path / "merged", MergeConfig(dtype="fp32", verify_samples=1))
    verification = json.loads((merged / MANIFEST).read_text())["verification"]
    assert verification["max_abs_diff"] <= verification["atol"]
    batch_path = _check_batch(merged, cfg.data.eval_path, tmp_path)
    _fresh_interpreter_logits(merged, batch_path, tmp_path / "fresh.pt")
    fresh = torch.load(tmp_path / "fresh.pt")
    assert fresh["cls"] == expected_cls
    want = _adapter_logits(cfg.model.path, adapter, batch_path)
    assert (want - fresh["logits"]).abs().max() <= 1e-4
    return verification


@pytest.mark.long  # its fixture preprocesses both families (~100 s) + 12 steps; CI runs it (make test-all)
def test_v46_lora_zero2_loss_falls_merge_reloads_in_plain_transformers(inputs, tmp_path):
    from raytune_minicpmv.train.trainer import run_train

    cfg = config(inputs["minicpmv4_6"], "v46_lora", "train.max_steps=12", "train.micro_batch_size=10",
                 "train.logging_steps=1", "train.eval_steps=12", "train.save_steps=12", "optim.lr=3e-3")
    s = run_train(cfg)
    assert s["steps"] == 12 and s["error"] is None
    losses = [loss for _, loss in s["loss_history"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    verification = _merge_and_reload(cfg, s, tmp_path, "MiniCPMV4_6ForConditionalGeneration")
    assert verification["adapter_effect"] > 1e-2  # the adapter (and the trained connector) changed the model


@pytest.mark.long
def test_v47_lora_trains_and_merge_reloads_in_plain_transformers(inputs, tmp_path):
    from raytune_minicpmv.train.trainer import run_train

    cfg = config(inputs["minicpmv4_7"], "v47_lora", "train.max_steps=2", "optim.warmup_steps=0", "train.micro_batch_size=4",
                 "train.logging_steps=1", "train.eval_steps=2", "train.save_steps=2", "optim.lr=3e-3")
    s = run_train(cfg)
    assert s["steps"] == 2 and s["error"] is None and all(loss > 0 for _, loss in s["loss_history"])
    _merge_and_reload(cfg, s, tmp_path, "MiniCPMV4_7ForConditionalGeneration")
