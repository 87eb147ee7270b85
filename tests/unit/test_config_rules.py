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


def test_a_token_budget_replaces_micro_batch_size_and_packing_needs_one():
    assert problems(train={"max_tokens_per_batch": 8192, "micro_batch_size": 2}) == [
        "train.micro_batch_size: 2 together with train.max_tokens_per_batch; they are alternatives (the budget "
        "decides how many samples a micro-batch holds): leave micro_batch_size at 1 or unset max_tokens_per_batch"]
    assert problems(data={"packing": True}) == [
        "data.packing: needs train.max_tokens_per_batch (the length of a packed row), e.g. 8192"]
    assert problems(data={"packing": True}, train={"max_tokens_per_batch": 8192}) == []
    assert problems(train={"max_tokens_per_batch": 8192}) == []


def test_packing_is_refused_for_a_family_that_cannot_train_on_packed_rows():
    found = problems(data={"packing": True}, train={"max_tokens_per_batch": 8192}, model={"family": "minicpmv2_0"})
    assert found == ["data.packing: model family minicpmv2_0 cannot train on packed rows (it loads through its "
                     "remote code, which knows no packed rows); set data.packing=false"]


def test_varlen_packed_attention_needs_a_half_precision_dtype():
    gpu = {"use_gpu": True}
    assert problems(model={"packed_attention": "varlen", "dtype": "fp32"}, scaling=gpu) == [
        "model.packed_attention: varlen runs in bf16/fp16 only; use sdpa or auto with model.dtype=fp32"]
    assert problems(model={"packed_attention": "varlen", "dtype": "bf16"}, scaling=gpu) == []
    assert problems(model={"packed_attention": "sdpa", "dtype": "fp32"}, scaling=gpu) == []


def test_the_seed_compat_preset_trains_the_llm_with_lora_so_a_quantized_base_is_fine():
    """The preset decides the trainable set (LoRA on the LLM), whatever trainable.llm says."""
    assert problems(model={"quantization": "nf4"}, trainable={"preset": "seed_compat", "llm": "full"}) == []
    assert problems(model={"quantization": "nf4"}, trainable={"llm": "full"}) == [
        "trainable.llm: full fine-tuning of an nf4-quantized LLM is not possible (its weights are packed integers "
        "without gradients); use trainable.llm=lora (QLoRA) or model.quantization=none"]


def test_generation_metrics_are_builtin_or_module_function_names_each_reported_under_its_own_name(tmp_path):
    ev = {"eval_path": str(tmp_path / "eval.jsonl")}  # not checked here (check_paths=False)
    assert problems(eval={"generation_metrics": ["exact_match", "token_f1", "my_pkg.scores:bleu"]}, data=ev) == []
    assert problems(eval={"generation_metrics": ["bleu", "my_pkg:"]}, data=ev) == [
        f"eval.generation_metrics: {name!r} is not exact_match, token_f1 or a 'module:function' (a function "
        "(prediction, reference) -> float)" for name in ("bleu", "my_pkg:")]
    assert problems(eval={"generation_metrics": ["a.scores:bleu", "b:bleu"]}, data=ev) == [
        "eval.generation_metrics: ['a.scores:bleu', 'b:bleu'] reports two metrics under one name (eval_<name>); "
        "give each a distinct name"]
    assert problems(eval={"generation_metrics": ["m:bleu", "m:rouge"]}, data=ev) == []


def test_generation_metrics_need_an_eval_split():
    assert problems(eval={"generation_metrics": ["exact_match"]}) == [
        "eval.generation_metrics: needs an eval split; set data.eval_path"]
    assert problems(eval={"generation_metrics": ["exact_match"]}, data={"preprocessed": True}) == []


def test_tuning_on_a_generation_metric_needs_it_reported_and_maximised(tmp_path):
    ev = {"eval_path": str(tmp_path / "eval.jsonl")}
    reported = {"generation_metrics": ["token_f1"]}
    assert problems(tune={"metric": "eval_token_f1", "mode": "max"}, eval=reported, data=ev) == []
    assert problems(tune={"metric": "eval_token_f1", "mode": "min"}, eval=reported, data=ev) == [
        "tune.mode: eval_token_f1 is better when higher; set tune.mode=max"]
    assert problems(tune={"metric": "eval_exact_match", "mode": "max"}, eval=reported, data=ev) == [
        "tune.metric: eval_exact_match is only reported with exact_match in eval.generation_metrics"]


@pytest.mark.parametrize("key, value, rule", [
    ("max_new_tokens", 0, ">= 1"), ("temperature", 0.0, "> 0"), ("top_p", 1.5, "in (0, 1]"),
    ("top_k", -1, ">= 0 (0 disables)"), ("repetition_penalty", 0.0, "> 0 (1 disables)"),
    ("seed", 2**32, "in [0, 2**32) or unset"), ("batch_size", 0, ">= 1"), ("num_actors", 0, ">= 1"),
    ("num_cpus_per_actor", 0.0, "> 0"), ("num_gpus_per_actor", -1.0, ">= 0 or unset"),
])
def test_a_decoding_setting_out_of_range_names_its_rule(key, value, rule):
    assert problems(generate={key: value}) == [f"generate.{key}: must be {rule}"]


def test_a_loguniform_lr_range_starting_at_zero_breaks_both_lr_rules():
    from raytune_minicpmv.config import SearchSpaceConfig

    assert problems(tune={"search": SearchSpaceConfig(lr=[0.0, 1e-3])}) == [
        "tune.search.lr: loguniform needs [low, high] with 0 < low < high",
        "tune.search.lr: learning rates must be in (0, 1)"]


def test_a_4x_family_this_transformers_cannot_build_is_named_with_the_upgrade(monkeypatch):
    """transformers here builds 4.6/4.7 (no family is blocked); an older release blocks them: the table says so."""
    import dataclasses

    from raytune_minicpmv.models.registry import FAMILIES

    assert problems(model={"family": "minicpmv4_6"}) == []
    why = "needs transformers >= 5.19 (found 5.10)"
    monkeypatch.setitem(FAMILIES, "minicpmv4_6", dataclasses.replace(FAMILIES["minicpmv4_6"], blocked=why))
    assert problems(model={"family": "minicpmv4_6"}) == [
        f"model.family: minicpmv4_6 {why}; pip install -U 'transformers>=5.19'"]
    assert problems(model={"family": "minicpmv2_0"}) == []  # blocked natively, but not by the transformers release


def test_flex_and_varlen_packed_attention_run_on_gpus_only():
    for kernel in ("flex", "varlen"):
        assert problems(model={"packed_attention": kernel}, scaling={"use_gpu": False}) == [
            f"model.packed_attention: {kernel} runs on GPUs only; use sdpa or auto on CPU"]
        assert problems(model={"packed_attention": kernel}, scaling={"use_gpu": True}) == []
    assert problems(model={"packed_attention": "sdpa"}, scaling={"use_gpu": False}) == []


def test_custom_worker_resources_and_the_merge_memory_name_their_fix():
    want = ["scaling.resources_per_worker: custom resources only (CPU/GPU come from cpus_per_worker/use_gpu), "
            "every amount > 0"]
    assert problems(scaling={"resources_per_worker": {"CPU": 2.0}}) == want
    assert problems(scaling={"resources_per_worker": {"accelerator_type_h200": 0.0}}) == want
    assert problems(scaling={"resources_per_worker": {"accelerator_type_h200": 0.5}}) == []
    assert problems(merge={"memory_gb": 0.0}) == ["merge.memory_gb: must be > 0 (or unset to estimate it)"]


FROZEN_LLM = {"vision": "full", "resampler": "full", "llm": "frozen"}
ZERO3_REFUSAL = ("deepspeed.zero_stage: 3 with trainable.llm=frozen is not supported for minicpmv4_6 (it hung in our "
                 "2-rank tests, cause not found); use deepspeed.zero_stage=2 (or auto), which holds these 1.3-1.6 B "
                 "models on any current card, or train the LLM (lora / full)")


@pytest.mark.parametrize("deepspeed, refused", [
    ({"zero_stage": 3}, True), ({"zero_stage": "auto", "offload_param": "cpu"}, True),  # parameter offload is ZeRO-3
    ({"zero_stage": 2}, False), ({"zero_stage": "auto"}, False),
])
def test_zero3_with_a_frozen_4x_llm_is_refused(deepspeed, refused):
    found = problems(model={"family": "minicpmv4_6"}, trainable=FROZEN_LLM, deepspeed=deepspeed)
    assert found == ([ZERO3_REFUSAL] if refused else [])
    assert problems(model={"family": "minicpmv4_6"}, trainable={**FROZEN_LLM, "llm": "lora"}, deepspeed=deepspeed) == []
    assert problems(model={"family": "minicpmv2_6"}, trainable=FROZEN_LLM, deepspeed=deepspeed) == []


def test_downsample_mode_4x_is_a_4x_family_setting():
    assert problems(model={"family": "minicpmv2_6", "downsample_mode": "4x"}) == [
        "model.downsample_mode: '4x' is a MiniCPM-V 4.6/4.7 setting; minicpmv2_6 has a resampler with a fixed "
        "query count (leave model.downsample_mode at 16x)"]
    assert problems(model={"family": "minicpmv4_6", "downsample_mode": "4x"}) == []
    # past the early return for 4x, the ZeRO-3 rule still applies only to ZeRO-3
    assert problems(model={"family": "minicpmv4_6", "downsample_mode": "4x"}, trainable=FROZEN_LLM,
                    deepspeed={"zero_stage": 2}) == []
