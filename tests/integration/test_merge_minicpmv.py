"""The merge on a tiny MiniCPM-V 2.6 (the package's model layer + PEFT), as a Ray task, and killed midway.

    .venv/bin/python -m pytest tests/integration/test_merge_minicpmv.py -q

The adapter is made the way the train stage makes it: `apply_trainable_policy` (LoRA on the LLM attention and the
vision tower, the resampler fully trained as a PEFT `modules_to_save` copy), with random non-zero weights standing in
for training, saved by `save_pretrained`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from raytune_minicpmv.config import LoraConfig, MergeConfig, TrainableConfig
from raytune_minicpmv.merge.merger import MANIFEST, merge_adapter, run_merge
from raytune_minicpmv.models import apply_trainable_policy, build_tiny, load_model
from raytune_minicpmv.data.pipeline import preprocess_for_check
from raytune_minicpmv.data.sample_data import write_sample_dataset
from raytune_minicpmv.merge.safetensors_stream import CheckpointReader
from tests.ray_teardown import shutdown_ray

pytestmark = pytest.mark.slow  # ~2 min on 2 CPU cores, most of it loading models and starting Ray


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_minicpmv")
    base = build_tiny("minicpmv2_6", root / "base", max_shard_size="300KB")
    model = load_model(base, dtype=torch.float32)
    peft_model = apply_trainable_policy(model, TrainableConfig(vision="lora", resampler="full", llm="lora"),
                                        LoraConfig(r=8, alpha=16))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:  # lora_B starts at zero; move everything trainable as training would
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(root / "adapter")
    data = write_sample_dataset(root / "data", split="eval")
    return base, root / "adapter", data


def _logits(model, batch):
    with torch.no_grad():
        return model(batch).logits.float()


def test_merged_minicpmv_reloads_and_matches_the_adapter_model(tiny, tmp_path):
    base, adapter, data = tiny
    assert len(CheckpointReader(base).weight_files) >= 2
    out = merge_adapter(base, adapter, tmp_path / "merged", MergeConfig(dtype="fp32", verify_atol=1e-4,
                                                                        max_shard_size="400KB"))
    manifest = json.loads((out / MANIFEST).read_text())
    verification = manifest["verification"]
    assert verification["samples"] == 2 and verification["max_abs_diff"] <= 1e-4 < 1e-2 < verification["adapter_effect"]
    for name in ("tokenizer_config.json", "preprocessor_config.json", "generation_config.json", "config.json"):
        assert (out / name).is_file(), name
    # Independent of the built-in check: the reloaded merged model vs PEFT's adapter model on other records.
    from peft import PeftModel

    reference = PeftModel.from_pretrained(load_model(base, dtype=torch.float32), adapter).eval()
    merged = load_model(out, dtype=torch.float32).eval()
    unmerged_base = load_model(base, dtype=torch.float32).eval()
    for index in (2, 3):
        batch = preprocess_for_check(out, data, index=index)
        want, got = _logits(reference, batch), _logits(merged, batch)
        assert (want - got).abs().max() <= 1e-4
        assert (want - _logits(unmerged_base, batch)).abs().max() > 1e-2  # the adapter matters
    resampler_key = "resampler.attn.out_proj.weight"
    assert not torch.equal(CheckpointReader(out).get(resampler_key), CheckpointReader(base).get(resampler_key))


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    shutdown_ray()


def test_run_merge_as_a_ray_task_then_noop(tiny, tmp_path, local_ray):
    base, adapter, _ = tiny
    out = run_merge(base, adapter, tmp_path / "merged", MergeConfig(dtype="bf16", num_cpus=1))
    manifest = json.loads((out / MANIFEST).read_text())
    v = manifest["verification"]  # the default tolerance: measured on the model (docs/MERGE.md)
    assert v["atol_source"] == "measured" and 0 < v["noise"] and v["max_abs_diff"] <= v["atol"] < v["adapter_effect"]
    assert manifest["dtype"] == "bf16"
    assert manifest["pid"] != os.getpid()  # it ran in a Ray worker, not here
    before = (out / MANIFEST).stat().st_mtime_ns
    assert run_merge(base, adapter, out, MergeConfig(dtype="bf16")) == out
    assert (out / MANIFEST).stat().st_mtime_ns == before


KILLABLE = textwrap.dedent("""
    import sys, time, pathlib
    import raytune_minicpmv.merge.adapter as la, raytune_minicpmv.merge.merger as m
    from raytune_minicpmv.config import MergeConfig
    real, n = m.merged_tensor, [0]
    def slow(*a, **k):  # signal once a few tensors are on disk, then dawdle so the parent can kill us mid-write
        n[0] += 1
        if n[0] == 20:
            pathlib.Path(sys.argv[4]).write_text("writing")
            time.sleep(120)
        return real(*a, **k)
    m.merged_tensor = slow
    m.merge_adapter(sys.argv[1], sys.argv[2], sys.argv[3], MergeConfig(verify_samples=0, max_shard_size="200KB"))
""")


def test_killed_midway_leaves_no_output_and_a_rerun_finishes(tiny, tmp_path):
    base, adapter, _ = tiny
    out, flag = tmp_path / "merged", tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(base), str(adapter), str(out), str(flag)])
    try:
        deadline = time.time() + 120
        while not flag.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert flag.exists(), "the merge subprocess never started writing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    tmp = tmp_path / ".merged.merging"
    assert not out.exists() and any(p.suffix == ".safetensors" for p in tmp.iterdir())
    merge_adapter(base, adapter, out, MergeConfig(verify_samples=1))
    assert (out / MANIFEST).is_file() and not tmp.exists()
