"""The config rules that are not numeric ranges (tests/unit/test_config_ranges.py has those): names, choices,
combinations of settings, the filesystem checks, every problem listed once and all at once.

Each rule is tested from both sides: the refused value, with its key path and the fix exactly as the user reads
them, and the legal value next to it, accepted. Found by mutation testing (docs/TESTING.md, "Config validation and
the merge task").

    .venv/bin/python -m pytest tests/unit/test_config_rules.py -q     (~2 s)
"""
from __future__ import annotations

from pathlib import Path

import pytest

from raytune_minicpmv.config import Config, replace, resolve_llm_type
from raytune_minicpmv.config.validation import validate

CKPT26 = str(Path(__file__).parents[1] / "assets" / "configs" / "minicpmv26_config")  # a real 2.6 config.json


def problems(**sections) -> list[str]:
    """validate() of the default config with some fields replaced, without the filesystem checks."""
    return validate(replace(Config(), **sections), check_paths=False)


@pytest.fixture
def usable(tmp_path) -> Config:
    """A config whose paths all exist (a data file, a real 2.6 checkpoint config, a writable storage dir)."""
    (tmp_path / "train.jsonl").write_text("")
    cfg = replace(Config(), data={"train_path": str(tmp_path / "train.jsonl")}, model={"path": CKPT26},
                  run={"storage_path": str(tmp_path / "runs")})
    assert validate(cfg) == []
    return cfg


@pytest.mark.parametrize("name", ["", "a/b"])
def test_a_run_name_must_be_a_non_empty_name_without_a_slash(name):
    assert problems(run={"name": name}) == ["run.name: must be a non-empty name without '/'"]
    assert problems(run={"name": "lr-3e-4_v2"}) == []


def test_the_driver_resource_is_a_resource_name_or_empty():
    assert problems(ray={"driver_resource": "trial-driver"}) == [
        'ray.driver_resource: must be a resource name like trial_driver (or "" to disable)']
    assert problems(ray={"driver_resource": "head_cpu"}) == problems(ray={"driver_resource": ""}) == []


@pytest.mark.parametrize("family, llm_type", [("minicpmv2_0", "minicpm"), ("minicpmv2_5", "llama3"),
                                              ("minicpmv2_6", "qwen2")])
def test_the_chat_template_follows_the_family_unless_data_llm_type_names_one(family, llm_type):
    cfg = replace(Config(), model={"family": family})
    assert resolve_llm_type(cfg) == llm_type
    assert resolve_llm_type(replace(cfg, data={"llm_type": "llama3"})) == "llama3"
    assert resolve_llm_type(replace(cfg, data={"llm_type": "qwen"})) == "qwen2"  # an alias


def test_vision_varlen_true_is_refused_only_for_minicpmv2_5():
    assert problems(model={"family": "minicpmv2_5", "vision_varlen": True}) == [
        "model.vision_varlen: true is not available for minicpmv2_5 (its vision tower attends the crops' padding, "
        "as the remote code does); use auto or false"]
    assert problems(model={"family": "minicpmv2_5", "vision_varlen": False}) == []
    assert problems(model={"family": "minicpmv2_6", "vision_varlen": True}) == []


def test_liger_true_needs_gpus_and_fp16_too():
    cpu = {"use_gpu": False}
    assert problems(model={"liger": True}, scaling=cpu) == [
        "model.liger: true needs GPUs (Liger Kernel is Triton/CUDA); set scaling.use_gpu=true or model.liger=auto"]
    assert problems(model={"dtype": "fp16"}, scaling=cpu) == ["model.dtype: fp16 needs GPUs; use bf16 or fp32 on CPU"]
    assert problems(model={"liger": False}, scaling=cpu) == problems(model={"dtype": "bf16"}, scaling=cpu) == []
    assert problems(model={"liger": True, "dtype": "fp16"}, scaling={"use_gpu": True}) == []


@pytest.mark.parametrize("key", ["target_modules", "vision_target_modules"])
def test_a_lora_module_pattern_must_be_a_regex(key):
    found = problems(lora={key: r"q_proj|(k_proj"})
    assert found == [f"lora.{key}: not a valid regex (missing ), unterminated subpattern at position 7)"]
    assert problems(lora={key: r"(q|k|v)_proj$"}) == []


def test_report_to_names_the_three_loggers():
    assert problems(train={"report_to": ["tensorboard", "mlflow", "wandb"]}) == []
    assert problems(train={"report_to": ["wandb", "comet"]}) == [
        "train.report_to: 'comet' is not tensorboard, mlflow or wandb"]


@pytest.mark.parametrize("stage, ok", [(0, False), (1, False), (2, False), (3, True), ("auto", True)])
def test_parameter_offload_needs_zero_3_or_auto(stage, ok):
    found = problems(deepspeed={"zero_stage": stage, "offload_param": "cpu"})
    assert found == ([] if ok else ["deepspeed.offload_param: parameter offload needs zero_stage 3 (or auto)"])


@pytest.mark.parametrize("stage, ok", [(0, False), (1, False), (2, True), (3, True), ("auto", True)])
def test_optimizer_offload_needs_zero_2_3_or_auto(stage, ok):
    found = problems(deepspeed={"zero_stage": stage, "offload_optimizer": "cpu"})
    assert found == ([] if ok else ["deepspeed.offload_optimizer: needs zero_stage 2, 3 or auto"])
    assert problems(deepspeed={"zero_stage": stage, "offload_optimizer": "none"}) == []


# --- the filesystem checks (check_paths=True) ---------------------------------------------------------------------


def test_preprocessed_data_must_exist_under_the_run(usable, tmp_path):
    cfg = replace(usable, data={"preprocessed": True})
    out = cfg.data_output_path
    assert validate(cfg) == [f"data.output_path: {out} does not exist (run `raytune-minicpmv preprocess` first, "
                             "or set data.preprocessed=false)"]
    assert validate(cfg, check_paths=False) == []
    Path(out).mkdir(parents=True)
    assert validate(cfg) == []
    assert validate(replace(cfg, data={"train_path": None})) == []  # preprocessed data needs no raw file


@pytest.mark.parametrize("key", ["eval_path", "tokenizer_path"])
def test_an_optional_path_must_exist_when_given(usable, tmp_path, key):
    missing = str(tmp_path / "nope.json")
    assert validate(replace(usable, data={key: missing})) == [f"data.{key}: {missing} does not exist"]
    (tmp_path / "there.json").write_text("[]")
    assert validate(replace(usable, data={key: str(tmp_path / "there.json")})) == []


def test_a_missing_model_path_is_named(usable, tmp_path):
    missing = str(tmp_path / "ckpt")
    assert validate(replace(usable, model={"path": missing})) == [f"model.path: {missing} does not exist"]


@pytest.mark.parametrize("key", ["train_path", "eval_path"])
def test_a_data_directory_is_refused_once_with_the_file_types(usable, tmp_path, key):
    """One problem per mistake: a directory given as data used to be reported twice, by two rules."""
    folder = tmp_path / "data"
    folder.mkdir()
    assert validate(replace(usable, data={key: str(folder)})) == [
        f"data.{key}: {folder} is a directory; give one .json, .jsonl or .parquet file"]


def test_every_problem_is_listed_at_once_in_the_order_of_the_sections(usable, tmp_path):
    cfg = replace(usable, run={"name": ""}, data={"eval_path": str(tmp_path / "eval.json")},
                  model={"path": str(tmp_path / "ckpt")}, lora={"target_modules": "("},
                  optim={"lr": 0.0}, train={"report_to": ["comet"]},
                  deepspeed={"zero_stage": 1, "offload_optimizer": "cpu"}, merge={"num_cpus": 0})
    assert [p.split(":")[0] for p in validate(cfg)] == [
        "run.name", "data.eval_path", "model.path", "lora.target_modules", "optim.lr", "train.report_to",
        "deepspeed.offload_optimizer", "merge.num_cpus"]
