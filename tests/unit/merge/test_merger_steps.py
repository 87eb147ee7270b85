"""The merge stage's steps on their own (no Ray, no verification model): shard-size parsing, which base files are
copied and how config.json is relabelled, where the adapter is looked up, when an existing output counts as
finished, the memory the Ray task declares, and what the manifest records.

Found by mutation testing (docs/TESTING.md): these steps ran only inside whole merges, whose assertions did not
see a wrong unit, a copied index file, a skipped `.git` or a wrong memory estimate.

Run: pytest tests/unit/merge/test_merger_steps.py   (~3 s)
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from raytune_minicpmv.config import MergeConfig
from raytune_minicpmv.merge.adapter import read_adapter
from raytune_minicpmv.merge.merger import (MANIFEST, copy_non_weight_files, estimate_memory_bytes, is_finished,
                                           merge_adapter, parse_size, resolve_adapter_dir, write_manifest)
from raytune_minicpmv.merge.safetensors_stream import CheckpointReader

MIB = 2**20


@pytest.mark.parametrize("text, size", [("500MB", 500 * 10**6), ("2GB", 2 * 10**9), ("40KB", 40 * 10**3),
                                        ("1TB", 10**12), (" 1.5gb ", 1_500_000_000), ("0.5MB", 500_000)])
def test_shard_sizes_are_decimal_units_case_and_space_insensitive(text, size):
    assert parse_size(text) == size


def base_dir(root: Path) -> Path:
    """A base checkpoint's directory: weights in every format the merge rewrites, their indexes, and the rest."""
    root.mkdir()
    for name in ("model-00001-of-00002.safetensors", "pytorch_model.bin", "vpm.pt", "x.pth", "x.ckpt", "x.h5",
                 "flax_model.msgpack", "x.gguf", "model.safetensors.index.json", "pytorch_model.bin.index.json"):
        (root / name).write_bytes(b"w")
    (root / "config.json").write_text(json.dumps({"torch_dtype": "float32", "dtype": "float32", "hidden_size": 8}))
    (root / "tokenizer_config.json").write_text("{}")
    (root / "modeling_minicpmv.py").write_text("# remote code\n")
    (root / "sub").mkdir()
    (root / "sub" / "notes.txt").write_text("kept")
    for skipped in (".git", ".cache"):
        (root / skipped).mkdir()
        (root / skipped / "HEAD").write_text("x")
    return root


def test_every_non_weight_file_is_copied_and_weights_indexes_and_vcs_dirs_are_not(tmp_path):
    base, out = base_dir(tmp_path / "base"), tmp_path / "out"
    out.mkdir()
    copied = copy_non_weight_files(base, out, "bf16")
    want = ["config.json", "modeling_minicpmv.py", "sub/notes.txt", "tokenizer_config.json"]
    assert sorted(copied) == want
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == want
    assert (out / "sub" / "notes.txt").read_text() == "kept"


@pytest.mark.parametrize("dtype, name", [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")])
def test_the_copied_config_names_the_merge_dtype_under_the_keys_it_had(tmp_path, dtype, name):
    base, out = base_dir(tmp_path / "base"), tmp_path / "out"
    out.mkdir()
    config = json.loads((base / "config.json").read_text())
    del config["dtype"]  # an older transformers wrote only torch_dtype: no key is added
    (base / "config.json").write_text(json.dumps(config))
    copy_non_weight_files(base, out, dtype)
    assert json.loads((out / "config.json").read_text()) == {"torch_dtype": name, "hidden_size": 8}
    assert (out / "config.json").read_text().endswith("}\n")


def test_the_adapter_dir_or_its_full_model_sibling(tmp_path):
    adapter = tmp_path / "ckpt" / "adapter"
    with pytest.raises(FileNotFoundError, match=f"adapter directory {adapter} does not exist"):
        resolve_adapter_dir(adapter)
    (tmp_path / "ckpt" / "full_model").mkdir(parents=True)
    assert resolve_adapter_dir(adapter) == tmp_path / "ckpt" / "full_model"
    adapter.mkdir()
    assert resolve_adapter_dir(adapter) == adapter  # an existing adapter/ wins
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_adapter_dir(tmp_path / "file")


def test_an_existing_output_is_finished_only_with_its_manifest_inputs_and_files(tmp_path):
    out = tmp_path / "merged"
    inputs = {"base": "/b", "adapter": "/a", "dtype": "bf16"}
    assert is_finished(out, inputs) is False  # nothing there yet
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"12345")
    with pytest.raises(FileExistsError, match=f"no {MANIFEST}"):
        is_finished(out, inputs)
    write_manifest(out, dict(inputs))
    assert is_finished(out, inputs) is True
    with pytest.raises(FileExistsError, match=r"other inputs \(\{'dtype': \('bf16', 'fp32'\)\}"):
        is_finished(out, {**inputs, "dtype": "fp32"})
    (out / "model.safetensors").write_bytes(b"1234")  # same name, other size
    with pytest.raises(FileExistsError, match=r"files changed or missing since the merge: \['model.safetensors'\]"):
        is_finished(out, inputs)
    (out / "model.safetensors").unlink()
    with pytest.raises(FileExistsError, match="model.safetensors"):
        is_finished(out, inputs)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Two fp32 weight files (4 KiB and 1 KiB) plus an int64 buffer, and a LoRA adapter of 512 bytes."""
    base = tmp_path / "base"
    base.mkdir()
    save_file({"a.weight": torch.zeros(32, 32), "ids": torch.zeros(16, dtype=torch.int64)},
              base / "model-00001-of-00002.safetensors")
    save_file({"b.weight": torch.zeros(16, 16)}, base / "model-00002-of-00002.safetensors")
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "ids": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors"}}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({"base_model.model.a.lora_A.weight": torch.zeros(2, 32),
               "base_model.model.a.lora_B.weight": torch.zeros(32, 2)}, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             "target_modules": ["a"]}))
    return base, adapter


def test_declared_memory_is_the_larger_phase_plus_headroom(tiny_checkpoint):
    """Streaming: 1.5 x (largest base file + adapter); verification: 1.3 x the model in the merge dtype + adapter
    (non-float tensors keep their size); plus 512 MiB for the interpreter and libraries."""
    base, adapter_dir = tiny_checkpoint
    reader = CheckpointReader(base)
    adapter = read_adapter(adapter_dir, set(reader.keys()))
    assert adapter.nbytes == 512
    largest = reader.largest_file_bytes
    assert largest >= 32 * 32 * 4 + 16 * 8
    for dtype, itemsize in (("bf16", 2), ("fp32", 4)):
        model = (32 * 32 + 16 * 16) * itemsize + 16 * 8
        verify = MergeConfig(dtype=dtype, verify_samples=2)
        want = int(max(1.5 * (largest + 512), 1.3 * model + 512) + 512 * MIB)
        assert estimate_memory_bytes(base, adapter_dir, verify) == want
    no_verify = MergeConfig(dtype="fp32", verify_samples=0)
    assert estimate_memory_bytes(base, adapter_dir, no_verify) == int(1.5 * (largest + 512) + 512 * MIB)


def test_the_manifest_names_the_inputs_the_writer_and_every_file(tiny_checkpoint, tmp_path):
    """Written last: the inputs a rerun compares, who wrote it (host, pid, library versions), every file's size."""
    import os
    import socket

    base, adapter = tiny_checkpoint
    out = merge_adapter(base, adapter, tmp_path / "merged", MergeConfig(dtype="fp32", verify_samples=0))
    manifest = json.loads((out / MANIFEST).read_text())
    assert (manifest["base"], manifest["adapter"], manifest["dtype"]) == (str(base), str(adapter), "fp32")
    assert manifest["verification"] == {"skipped": True} and manifest["dequantized_base"] is False
    assert (manifest["host"], manifest["pid"]) == (socket.gethostname(), os.getpid())
    assert type(manifest["seconds"]) is float and manifest["seconds"] == round(manifest["seconds"], 1) >= 0  # 0.1 s
    assert manifest["versions"]["torch"] == torch.__version__
    assert set(manifest["versions"]) == {"torch", "transformers", "peft", "safetensors"}
    files = {str(p.relative_to(out)): p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert manifest["files"] == files and any(name.endswith(".safetensors") for name in files)


def test_run_merge_of_a_finished_output_returns_it_without_starting_ray(tiny_checkpoint, tmp_path):
    """The Ray-task entry point checks the output first (the same inputs as merge_adapter's manifest)."""
    import ray

    from raytune_minicpmv.merge.merger import run_merge

    base, adapter = tiny_checkpoint
    cfg = MergeConfig(dtype="fp32", verify_samples=0)
    out = merge_adapter(base, adapter, tmp_path / "merged", cfg)
    assert run_merge(base, adapter, out, cfg) == out
    assert not ray.is_initialized()


def test_the_ray_task_declares_the_estimate_within_the_clusters_memory(tiny_checkpoint, caplog):
    """`run_merge`'s task options from `ray.cluster_resources()`: the estimate when the cluster has room for it, the
    cluster's Ray memory when it has less (with a warning), the estimate when the cluster reports no memory."""
    from raytune_minicpmv.config import RayConfig
    from raytune_minicpmv.merge.merger import merge_task_options

    base, adapter = tiny_checkpoint
    cfg = MergeConfig(dtype="fp32", verify_samples=0, num_cpus=3, num_gpus=0)
    estimate = estimate_memory_bytes(base, adapter, cfg)
    roomy = merge_task_options(base, adapter, cfg, RayConfig(), {"CPU": 8.0, "memory": float(estimate + 1)})
    assert roomy == {"num_cpus": 3, "num_gpus": 0, "memory": estimate, "resources": None, "max_retries": 2,
                     "retry_exceptions": False}
    assert merge_task_options(base, adapter, cfg, RayConfig(), {"CPU": 8.0})["memory"] == estimate
    with caplog.at_level("WARNING", logger="raytune_minicpmv.merge.merger"):
        small = merge_task_options(base, adapter, cfg, RayConfig(), {"memory": 300.0 * MIB + 0.5})
    assert small["memory"] == 300 * MIB and type(small["memory"]) is int
    assert "exceeds the cluster's 0.3 GiB of Ray memory; declaring the latter" in caplog.text


def test_merge_memory_gb_is_declared_as_given_even_above_the_clusters_memory(tiny_checkpoint):
    """merge.memory_gb overrides the estimate and the cap (the user knows better, e.g. an autoscaler adds nodes)."""
    from raytune_minicpmv.config import RayConfig
    from raytune_minicpmv.merge.merger import merge_task_options

    base, adapter = tiny_checkpoint
    cfg = MergeConfig(dtype="fp32", memory_gb=1.5, num_gpus=0.5)
    options = merge_task_options(base, adapter, cfg, RayConfig(), {"memory": float(MIB)})
    assert options["memory"] == 1536 * MIB and options["num_gpus"] == 0.5


@pytest.mark.parametrize("num_gpus, driver_resource, cluster, want", [
    (0, "trial_driver", {"trial_driver": 100.0}, {"trial_driver": 1.0}),  # the CPU head of cluster.yaml
    (0, "trial_driver", {"trial_driver": 0.5}, None),  # less than one unit: nowhere to place the request
    (0, "trial_driver", {}, None),  # a local Ray has no driver resource
    (0, "", {"trial_driver": 100.0}, None),  # ray.driver_resource="" turns it off
    (0, "merge_host", {"merge_host": 1.0, "trial_driver": 100.0}, {"merge_host": 1.0}),
    (1, "trial_driver", {"trial_driver": 100.0}, None),  # a GPU merge must go to a GPU node, not the head
])
def test_a_cpu_merge_asks_for_the_driver_resource_when_the_cluster_has_it(tiny_checkpoint, num_gpus, driver_resource,
                                                                          cluster, want):
    from raytune_minicpmv.config import RayConfig
    from raytune_minicpmv.merge.merger import merge_task_options

    base, adapter = tiny_checkpoint
    cfg = MergeConfig(dtype="fp32", memory_gb=1, num_gpus=num_gpus)
    options = merge_task_options(base, adapter, cfg, RayConfig(driver_resource=driver_resource), cluster)
    assert options["resources"] == want and options["num_gpus"] == num_gpus


def test_the_ray_task_body_merges_and_returns_the_output_path_as_text(tiny_checkpoint, tmp_path):
    """What the Ray worker runs (`run_merge` turns its string result back into a Path)."""
    from raytune_minicpmv.merge.merger import _merge_task

    base, adapter = tiny_checkpoint
    out = tmp_path / "merged"
    result = _merge_task(str(base), str(adapter), str(out), MergeConfig(dtype="bf16", verify_samples=0))
    assert result == str(out) and type(result) is str
    assert json.loads((out / MANIFEST).read_text())["dtype"] == "bf16"


@pytest.mark.parametrize("layout, packed_bytes, float_elements", [("nf4", 512 + 40 + 128, 16 * 16),
                                                                   ("int8", 32 * 32 + 128, 32 + 16 * 16)])
def test_a_quantized_base_declares_memory_for_its_dequantized_model(tiny_checkpoint, layout, packed_bytes,
                                                                    float_elements):
    """A bitsandbytes base (`.quant_state.` keys for 4-bit, `.SCB` for LLM.int8) is dequantized whole before the
    merge: each packed (non-float) byte may hold two weights, each in the merge dtype; float tensors are counted in
    that dtype. Here the int64 buffer `ids` (128 bytes) counts as packed too."""
    base, adapter_dir = tiny_checkpoint
    packed = {"nf4": {"a.weight": torch.zeros(512, 1, dtype=torch.uint8),
                      "a.weight.quant_state.bitsandbytes__nf4": torch.zeros(40, dtype=torch.uint8)},
              "int8": {"a.weight": torch.zeros(32, 32, dtype=torch.int8), "a.SCB": torch.zeros(32)}}[layout]
    save_file({**packed, "ids": torch.zeros(16, dtype=torch.int64)}, base / "model-00001-of-00002.safetensors")
    largest = CheckpointReader(base).largest_file_bytes
    for dtype, itemsize in (("bf16", 2), ("fp32", 4)):
        model = packed_bytes * 2 * itemsize + float_elements * itemsize
        want = int(max(1.5 * (largest + 512), 1.3 * model + 512) + 512 * MIB)
        assert estimate_memory_bytes(base, adapter_dir, MergeConfig(dtype=dtype, verify_samples=2)) == want


def test_the_temp_dir_sits_next_to_the_output_whose_parents_may_not_exist_yet(tmp_path):
    from raytune_minicpmv.merge.merger import fresh_temp_dir

    out = tmp_path / "runs" / "r1" / "merged"  # nothing of it exists yet
    tmp = fresh_temp_dir(out)
    assert tmp == tmp_path / "runs" / "r1" / ".merged.merging" and tmp.is_dir()
    (tmp / "model-00001-of-00002.safetensors").write_bytes(b"half")  # an interrupted merge's leftovers
    assert fresh_temp_dir(out) == tmp and list(tmp.iterdir()) == []


def test_a_quantized_base_is_merged_into_its_dequantized_copy_in_the_merge_dtype(tmp_path):
    """plain_base: a bitsandbytes checkpoint becomes a plain copy next to the output (replacing an interrupted
    merge's copy), its floats in merge.dtype and its config without `quantization_config`; a plain base is itself."""
    pytest.importorskip("bitsandbytes")
    from raytune_minicpmv.merge.merger import plain_base
    from raytune_minicpmv.models import build_tiny, load_model

    plain = Path(build_tiny("minicpmv2_6", tmp_path / "bf16"))
    out = tmp_path / "merged"
    assert plain_base(plain, out, MergeConfig(dtype="fp32")) == plain
    nf4 = tmp_path / "nf4"
    load_model(plain, dtype=torch.bfloat16, quantization="nf4").save_pretrained(str(nf4))
    assert "quantization_config" in json.loads((nf4 / "config.json").read_text())
    work = tmp_path / ".merged.dequantized-base"
    work.mkdir()
    (work / "stale.safetensors").write_bytes(b"x")
    assert plain_base(nf4, out, MergeConfig(dtype="fp32")) == work
    assert not (work / "stale.safetensors").exists()
    config = json.loads((work / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "float32"
    reader = CheckpointReader(work)
    assert {e.dtype for e in reader.entries} == {torch.float32}
    assert set(reader.keys()) == set(CheckpointReader(plain).keys())  # packed weights and their states are gone

    # the whole merge into that base: it says so in the manifest and removes the copy once published
    from peft import LoraConfig, get_peft_model

    targets = r"llm\..*layers\.\d+\.self_attn\.(q_proj|v_proj)"
    lora = get_peft_model(load_model(plain, dtype=torch.float32), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    lora.save_pretrained(str(tmp_path / "adapter"))
    merged = merge_adapter(nf4, tmp_path / "adapter", out, MergeConfig(dtype="fp32", verify_samples=0))
    assert json.loads((merged / MANIFEST).read_text())["dequantized_base"] is True and not work.exists()
