"""Every CLI path on a checkpoint in the PUBLISHED layout (issue 9): validate, preprocess, train (the shipped LoRA
seed recipe with checkpoint saves, then a resume), full fine-tuning, tune, merge, and the merged folder reloading —
in this process (demo-style), and in fresh interpreters.

The checkpoint is `published26` (tests/conftest.py): the real MiniCPM-V 2.6 config.json / tokenizer_config.json /
preprocessor files with only the sizes shrunk, sharded random weights, empty remote-code placeholders. The shipped
configs are used as they are, with only sizes, paths and the CPU cluster overridden. One Ray session for the module;
the data is preprocessed once and every run streams the Parquet rows.
    flock /tmp/raytest.lock python -m pytest tests/integration/test_published_layout.py -q
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raytune_minicpmv import cli
from raytune_minicpmv.config import load_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
LORA_YAML = ROOT / "configs" / "minicpmv26_lora.yaml"
TUNE_YAML = ROOT / "configs" / "minicpmv26_tune.yaml"
# The CPU cluster and the sizes; nothing else of the shipped recipe changes (lr, scheduler, ZeRO-3, the trainable
# set: LoRA on the LLM + full vision tower + full resampler, gradient checkpointing, bf16).
CPU = ["ray.address=null", "scaling.num_workers=2", "scaling.use_gpu=false", "scaling.cpus_per_worker=0.8",
       "data.num_cpus_per_task=0.1", "data.max_slice_nums=2", "data.model_max_length=512", "lora.r=8",
       "lora.alpha=16", "train.micro_batch_size=1", "train.gradient_accumulation_steps=1", "train.logging_steps=1",
       "train.eval_max_batches=1", "train.max_failures=0", "deepspeed.zero_stage=3"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory, published26, ray_session):
    """Sample data preprocessed ONCE with the published folder's own tokenizer (`raytune-minicpmv preprocess`)."""
    from raytune_minicpmv.data.sample_data import write_sample_dataset

    root = tmp_path_factory.mktemp("published_runs")
    p = {"model.path": str(published26),
         "data.train_path": str(write_sample_dataset(root / "data", "train", num_records=8)),
         "data.eval_path": str(write_sample_dataset(root / "data", "eval", num_records=2)),
         "data.output_path": str(root / "rows"), "run.storage_path": str(root / "runs")}
    assert cli.main(["preprocess", "-c", str(LORA_YAML), *overrides(p), *CPU]) == 0
    report = json.loads((root / "rows" / "report.json").read_text())
    assert report["splits"]["train"]["records_out"] == 8 and report["splits"]["eval"]["records_out"] == 2, report
    assert report["model_spec"]["query_num"] == 64 and report["model_spec"]["use_image_id"] is True
    return {**p, "data.preprocessed": "true"}


def overrides(d: dict) -> list[str]:
    return [f"{k}={v}" for k, v in d.items()]


@pytest.fixture(scope="module")
def lora_run(paths):
    """`raytune-minicpmv train` with the shipped LoRA recipe: 4 steps, a checkpoint every 2, eval every 2."""
    args = [*overrides(paths), *CPU, "run.name=lora", "train.max_steps=4", "train.save_steps=2",
            "train.eval_steps=2", "train.save_total_limit=2"]
    assert cli.main(["train", "-c", str(LORA_YAML), *args]) == 0
    return load_config(LORA_YAML, args)


def test_validate_the_shipped_recipe_on_the_published_folder(paths, capsys):
    assert cli.main(["validate", "-c", str(LORA_YAML), *overrides(paths), *CPU]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["model"]["path"] == paths["model.path"] and resolved["trainable"]["vision"] == "full"


def test_lora_recipe_saves_checkpoints_with_a_portable_adapter(lora_run, published26):
    run_dir = Path(lora_run.run_dir)
    ckpts = sorted(p for p in run_dir.glob("checkpoint_step_*") if p.is_dir())
    assert [p.name for p in ckpts] == ["checkpoint_step_0000002", "checkpoint_step_0000004"]
    last = ckpts[-1]
    assert json.loads((last / "train_state.json").read_text())["step"] == 4
    adapter_cfg = json.loads((last / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(published26)
    assert adapter_cfg["auto_mapping"] == {"base_model_class": "AutoModel", "parent_library": "transformers"}
    assert set(adapter_cfg["modules_to_save"]) == {"resampler", "vpm"}


@pytest.fixture(scope="module")
def merged(lora_run, published26, tmp_path_factory):
    """`raytune-minicpmv merge` of the step-4 adapter into the published base."""
    out = tmp_path_factory.mktemp("merge") / "MiniCPM-V-2_6-merged"
    adapter = Path(lora_run.run_dir) / "checkpoint_step_0000004" / "adapter"
    assert cli.main(["merge", "--base", str(published26), "--adapter", str(adapter), "--out", str(out),
                     "-c", str(LORA_YAML), "merge.dtype=fp32"]) == 0
    return out


def test_merge_keeps_the_published_folder_as_it_was(merged, published26):
    """The merged folder is the base folder with new weights: its config.json keeps model_type / auto_map /
    architectures / version (what trust_remote_code loading and vLLM dispatch on), and every remote-code file,
    tokenizer file and processor file is copied byte for byte."""
    base_cfg, merged_cfg = (json.loads((d / "config.json").read_text()) for d in (published26, merged))
    assert {k: v for k, v in merged_cfg.items() if k != "torch_dtype"} == \
        {k: v for k, v in base_cfg.items() if k != "torch_dtype"}
    assert merged_cfg["model_type"] == "minicpmv" and merged_cfg["auto_map"]["AutoModel"] == \
        "modeling_minicpmv.MiniCPMV" and merged_cfg["torch_dtype"] == "float32"
    for f in published26.iterdir():
        if f.suffix in (".py", ".txt", ".jinja") or (f.suffix == ".json" and f.name not in (
                "config.json", "model.safetensors.index.json")):
            assert (merged / f.name).read_bytes() == f.read_bytes(), f.name
    check = json.loads((merged / "merge_manifest.json").read_text())["verification"]
    assert check["samples"] == 2 and check["max_abs_diff"] <= check["atol"] and check["adapter_effect"] > 0
    base_keys = set(json.loads((published26 / "model.safetensors.index.json").read_text())["weight_map"])
    assert set(json.loads((merged / "model.safetensors.index.json").read_text())["weight_map"]) == base_keys


def test_merged_folder_reloads_demo_style(merged, paths):
    from raytune_minicpmv.demo import reload_check

    line = reload_check(str(merged), paths["data.train_path"])
    assert line.endswith("finite") and "(1, " in line and ", 151666)" in line, line


def test_merged_folder_loads_in_a_fresh_interpreter(merged, paths):
    """The documented native one-liner (docs/MERGE.md) in a fresh interpreter, and the same logits as this process."""
    from raytune_minicpmv.models import load_model
    from raytune_minicpmv.data.pipeline import preprocess_for_check

    one_liner = ("import sys, torch; from raytune_minicpmv.models import load_model; "
                 "m = load_model(sys.argv[1], dtype=torch.float32); "
                 "print('PARAMS', sum(p.double().sum().item() for p in m.parameters()))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", one_liner, str(merged)], capture_output=True, text=True,
                         timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    here = load_model(merged, dtype=torch.float32)
    assert float(out.stdout.split("PARAMS")[1]) == pytest.approx(sum(p.double().sum().item()
                                                                     for p in here.parameters()), rel=1e-12)
    with torch.no_grad():
        logits = here.eval()(preprocess_for_check(merged, paths["data.train_path"])).logits
    assert torch.isfinite(logits).all()


def test_resume_continues_from_the_last_checkpoint(lora_run, paths):
    from raytune_minicpmv.train.trainer import run_train

    s = run_train(load_config(LORA_YAML, [*overrides(paths), *CPU, "run.name=lora", "train.max_steps=6",
                                          "train.save_steps=2", "train.eval_steps=2", "train.save_total_limit=3"]))
    assert s["error"] is None and s["steps"] == 6
    assert s["resumed_from_step"] == 4  # not a restart from 0
    assert [step for step, _ in s["loss_history"]][-2:] == [5, 6]
    assert Path(s["checkpoint"]).name == "checkpoint_step_0000006"


def test_full_fine_tuning_on_the_published_folder(paths):
    from safetensors.torch import load_file

    from raytune_minicpmv.models import load_model
    from raytune_minicpmv.train.trainer import run_train

    cfg = load_config(LORA_YAML, [*overrides(paths), *CPU, "run.name=full", "trainable.llm=full",
                                  "trainable.vision=frozen", "trainable.resampler=full", "trainable.embed_tokens=frozen",
                                  "train.max_steps=2", "train.save_steps=2", "train.eval_steps=2", "optim.lr=1e-3"])
    s = run_train(cfg)
    assert s["error"] is None and s["steps"] == 2
    trained = load_file(Path(s["checkpoint"]) / "full_model" / "model.safetensors")
    base = dict(load_model(cfg.model.path, dtype=torch.float32).named_parameters())
    assert trained and set(trained) <= set(base) and "llm.lm_head.weight" in trained
    assert not any(k.startswith(("vpm.", "llm.model.embed_tokens")) for k in trained)  # frozen parts stay out
    assert any(not torch.equal(trained[k].float(), base[k].detach()) for k in trained)


def test_tune_on_the_published_folder(paths):
    from raytune_minicpmv.tune.search import run_tune

    cfg = load_config(TUNE_YAML, [*overrides(paths), *CPU, "run.name=tune", "train.max_steps=2",
                                  "train.eval_steps=2", "tune.grace_period=1", "tune.search.lr=[1e-3]",
                                  "tune.search.lr_sampler=grid",
                                  "tune.num_samples=1", "tune.max_concurrent_trials=1", "merge.enabled=false"])
    summary = run_tune(cfg)
    assert summary["error"] == 0 and len(summary["rows"]) == 1 and summary["rows"][0]["steps"] == 2
    assert summary["best_trial"] == summary["rows"][0]["trial"] and summary["best_metric"] > 0
