"""Every numeric config field refuses the values just outside its range, naming the key path, and accepts the
values on the edge (issue 18 item 6: `optim.lr=0` and friends).

    .venv/bin/python -m pytest tests/unit/test_config_ranges.py -q

Each row is one boundary, tested from both sides, so flipping a `<` into `<=` in `config.validate` fails a test.
"""
from __future__ import annotations

import pytest

from raytune_minicpmv.config import ConfigError, load_config

# (overrides just outside the range, the key path the problem must name, overrides on the edge that must load)
BOUNDARIES = [
    (["run.seed=-1"], "run.seed", ["run.seed=0"]),
    (["run.seed=4294967296"], "run.seed", ["run.seed=4294967295"]),
    (["ray.num_cpus=0"], "ray.num_cpus", ["ray.num_cpus=1"]),
    (["ray.worker_group_start_timeout_s=0"], "ray.worker_group_start_timeout_s",
     ["ray.worker_group_start_timeout_s=0.1"]),
    (["data.model_max_length=15"], "data.model_max_length", ["data.model_max_length=16"]),
    (["data.max_slice_nums=0"], "data.max_slice_nums", ["data.max_slice_nums=1"]),
    (["data.max_slice_nums=37"], "data.max_slice_nums", ["data.max_slice_nums=36"]),
    (["data.max_skip_fraction=-0.01"], "data.max_skip_fraction", ["data.max_skip_fraction=0"]),
    (["data.max_skip_fraction=1.01"], "data.max_skip_fraction", ["data.max_skip_fraction=1"]),
    (["data.map_batch_size=0"], "data.map_batch_size", ["data.map_batch_size=1"]),
    (["data.num_cpus_per_task=0"], "data.num_cpus_per_task", ["data.num_cpus_per_task=0.01"]),
    (["data.num_cpus_per_task=64.5"], "data.num_cpus_per_task", ["data.num_cpus_per_task=64"]),
    (["data.max_tasks=0"], "data.max_tasks", ["data.max_tasks=1"]),
    (["lora.r=0"], "lora.r", ["lora.r=1"]),
    (["lora.alpha=0"], "lora.alpha", ["lora.alpha=1"]),
    (["lora.dropout=-0.1"], "lora.dropout", ["lora.dropout=0"]),
    (["lora.dropout=1"], "lora.dropout", ["lora.dropout=0.99"]),
    (["deepspeed.memory_fraction=0.09"], "deepspeed.memory_fraction", ["deepspeed.memory_fraction=0.1"]),
    (["deepspeed.memory_fraction=1.01"], "deepspeed.memory_fraction", ["deepspeed.memory_fraction=1"]),
    (["train.profile_steps=-1"], "train.profile_steps", ["train.profile_steps=0"]),
    (["model.vision_chunk_crops=0"], "model.vision_chunk_crops", ["model.vision_chunk_crops=1"]),
    (["optim.lr=0"], "optim.lr", ["optim.lr=1e-9"]),
    (["optim.lr=1"], "optim.lr", ["optim.lr=0.99"]),
    (["optim.lr=-1e-4"], "optim.lr", []),
    (["optim.weight_decay=-0.1"], "optim.weight_decay", ["optim.weight_decay=0"]),
    (["optim.adam_beta1=-0.1"], "optim.adam_beta1", ["optim.adam_beta1=0"]),
    (["optim.adam_beta1=1"], "optim.adam_beta1", ["optim.adam_beta1=0.999"]),
    (["optim.adam_beta2=1"], "optim.adam_beta2", ["optim.adam_beta2=0.999"]),
    (["optim.adam_beta2=-0.5"], "optim.adam_beta2", ["optim.adam_beta2=0"]),
    (["optim.adam_eps=0"], "optim.adam_eps", ["optim.adam_eps=1e-12"]),
    (["optim.max_grad_norm=-1"], "optim.max_grad_norm", ["optim.max_grad_norm=0"]),
    (["optim.warmup_ratio=-0.01"], "optim.warmup_ratio", ["optim.warmup_ratio=0"]),
    (["optim.warmup_ratio=1"], "optim.warmup_ratio", ["optim.warmup_ratio=0.99"]),
    (["optim.warmup_ratio=1.5"], "optim.warmup_ratio", []),
    (["optim.warmup_steps=-1"], "optim.warmup_steps", ["optim.warmup_steps=0"]),
    (["train.max_steps=10", "optim.warmup_steps=10"], "optim.warmup_steps",
     ["train.max_steps=10", "optim.warmup_steps=9"]),
    (["optim.min_lr_ratio=-0.1"], "optim.min_lr_ratio", ["optim.min_lr_ratio=0"]),
    (["optim.min_lr_ratio=1.1"], "optim.min_lr_ratio", ["optim.min_lr_ratio=1"]),
    (["train.max_steps=0"], "train.max_steps", ["train.max_steps=1"]),
    (["train.max_steps=-5"], "train.max_steps", []),
    (["train.micro_batch_size=0"], "train.micro_batch_size", ["train.micro_batch_size=1"]),
    (["data.model_max_length=2048", "train.max_tokens_per_batch=2047"], "train.max_tokens_per_batch",
     ["data.model_max_length=2048", "train.max_tokens_per_batch=2048"]),
    (["train.gradient_accumulation_steps=0"], "train.gradient_accumulation_steps",
     ["train.gradient_accumulation_steps=1"]),
    (["train.eval_steps=0"], "train.eval_steps", ["train.eval_steps=1"]),
    (["train.eval_max_batches=0"], "train.eval_max_batches", ["train.eval_max_batches=1"]),
    (["train.logging_steps=0"], "train.logging_steps", ["train.logging_steps=1"]),
    (["train.save_steps=0"], "train.save_steps", ["train.save_steps=1"]),
    (["train.save_total_limit=0"], "train.save_total_limit", ["train.save_total_limit=1"]),
    (["train.max_failures=-2"], "train.max_failures", ["train.max_failures=-1"]),
    (["train.fail_at_step=0"], "train.fail_at_step", ["train.fail_at_step=1"]),
    (["train.max_steps=10", "train.fail_at_step=11"], "train.fail_at_step",
     ["train.max_steps=10", "train.fail_at_step=10"]),
    (["deepspeed.reduce_bucket_size=0"], "deepspeed.reduce_bucket_size", ["deepspeed.reduce_bucket_size=1"]),
    (["deepspeed.param_persistence_threshold=-1"], "deepspeed.param_persistence_threshold",
     ["deepspeed.param_persistence_threshold=0"]),
    (["deepspeed.fp16_initial_scale_power=3"], "deepspeed.fp16_initial_scale_power",
     ["deepspeed.fp16_initial_scale_power=4"]),
    (["deepspeed.fp16_initial_scale_power=33"], "deepspeed.fp16_initial_scale_power",
     ["deepspeed.fp16_initial_scale_power=32"]),
    (["scaling.num_workers=0"], "scaling.num_workers", ["scaling.num_workers=1"]),
    (["scaling.cpus_per_worker=0"], "scaling.cpus_per_worker", ["scaling.cpus_per_worker=0.1"]),
    (["scaling.resources_per_worker={gpu_standin: 0}"], "scaling.resources_per_worker",
     ["scaling.resources_per_worker={gpu_standin: 0.01}"]),
    (["tune.num_samples=0"], "tune.num_samples", ["tune.num_samples=1"]),
    (["tune.grace_period=0"], "tune.grace_period", ["tune.grace_period=1"]),
    (["tune.reduction_factor=1"], "tune.reduction_factor", ["tune.reduction_factor=2"]),
    (["tune.reduction_factor=0"], "tune.reduction_factor", []),
    (["tune.grace_period=2", "tune.max_t=1"], "tune.max_t", ["tune.grace_period=2", "tune.max_t=2"]),
    (["tune.max_concurrent_trials=0"], "tune.max_concurrent_trials", ["tune.max_concurrent_trials=1"]),
    (["tune.max_failures=-2"], "tune.max_failures", ["tune.max_failures=-1"]),
    (["tune.driver_resources={CPU: 0}"], "tune.driver_resources", ["tune.driver_resources={CPU: 0.01}"]),
    (["tune.search.lr=[0, 1e-3]"], "tune.search.lr", ["tune.search.lr=[1e-9, 1e-3]"]),
    (["tune.search.lr=[1e-5, 1]"], "tune.search.lr", ["tune.search.lr=[1e-5, 0.99]"]),
    (["tune.search.lr=[1e-3, 1e-3]"], "tune.search.lr", []),
    (["tune.search.lr_sampler=grid", "tune.search.lr=[]"], "tune.search.lr",
     ["tune.search.lr_sampler=grid", "tune.search.lr=[1e-4]"]),
    (["tune.search.lr_sampler=grid", "tune.search.lr=[1e-4, 0]"], "tune.search.lr", []),
    (["tune.search.weight_decay=[-0.1]"], "tune.search.weight_decay", ["tune.search.weight_decay=[0]"]),
    (["tune.search.weight_decay=[]"], "tune.search.weight_decay", []),
    (["tune.search.lora_r=[8, 0]"], "tune.search.lora_r", ["tune.search.lora_r=[8, 1]"]),
    (["tune.search.lora_r=[]"], "tune.search.lora_r", []),
    (["tune.search.warmup_ratio=[0.1, 1]"], "tune.search.warmup_ratio", ["tune.search.warmup_ratio=[0, 0.99]"]),
    (["tune.search.warmup_ratio=[-0.1]"], "tune.search.warmup_ratio", []),
    (["tune.search.warmup_ratio=[]"], "tune.search.warmup_ratio", []),
    (["merge.verify_samples=-1"], "merge.verify_samples", ["merge.verify_samples=0"]),
    (["merge.verify_atol=0"], "merge.verify_atol", ["merge.verify_atol=1e-9"]),
    (["merge.verify_noise_factor=0.99"], "merge.verify_noise_factor", ["merge.verify_noise_factor=1"]),
    (["merge.num_cpus=0"], "merge.num_cpus", ["merge.num_cpus=0.1"]),
    (["merge.max_shard_size=0MB"], "merge.max_shard_size", ["merge.max_shard_size=1KB"]),
    (["merge.max_shard_size=2 GiB"], "merge.max_shard_size", ["merge.max_shard_size=0.5GB"]),
    (["merge.memory_gb=0"], "merge.memory_gb", ["merge.memory_gb=0.1"]),
    (["merge.num_gpus=-1"], "merge.num_gpus", ["merge.num_gpus=0"]),
    (["merge.num_gpus=1.5"], "merge.num_gpus", ["merge.num_gpus=0.5", "merge.num_gpus=2"]),
    (["eval.generation_max_samples=0"], "eval.generation_max_samples", ["eval.generation_max_samples=1"]),
    (["eval.generation_batch_size=0"], "eval.generation_batch_size", ["eval.generation_batch_size=1"]),
    (["eval.generation_max_new_tokens=0"], "eval.generation_max_new_tokens", ["eval.generation_max_new_tokens=1"]),
    (["generate.max_new_tokens=0"], "generate.max_new_tokens", ["generate.max_new_tokens=1"]),
    (["generate.temperature=0"], "generate.temperature", ["generate.temperature=0.01"]),
    (["generate.top_p=0"], "generate.top_p", ["generate.top_p=0.01"]),
    (["generate.top_p=1.01"], "generate.top_p", ["generate.top_p=1"]),
    (["generate.top_k=-1"], "generate.top_k", ["generate.top_k=0"]),
    (["generate.repetition_penalty=0"], "generate.repetition_penalty", ["generate.repetition_penalty=0.01"]),
    (["generate.seed=-1"], "generate.seed", ["generate.seed=0"]),
    (["generate.seed=4294967296"], "generate.seed", ["generate.seed=4294967295"]),
    (["generate.batch_size=0"], "generate.batch_size", ["generate.batch_size=1"]),
    (["generate.num_actors=0"], "generate.num_actors", ["generate.num_actors=1"]),
    (["generate.num_cpus_per_actor=0"], "generate.num_cpus_per_actor", ["generate.num_cpus_per_actor=0.1"]),
    (["generate.num_gpus_per_actor=-1"], "generate.num_gpus_per_actor", ["generate.num_gpus_per_actor=0"]),
]


def _problems(overrides):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, check_paths=False)
    return e.value.problems


def _key(override):
    return override.split("=", 1)[0]


@pytest.mark.parametrize("outside,key,edge", BOUNDARIES, ids=[" ".join(b[0]) for b in BOUNDARIES])
def test_outside_the_range_is_refused_with_the_key_path(outside, key, edge):
    problems = _problems(outside)
    assert problems and all(p.startswith(key + ":") for p in problems), problems  # this key's rules, no other


@pytest.mark.parametrize("outside,key,edge", [b for b in BOUNDARIES if b[2]],
                         ids=[" ".join(b[2]) for b in BOUNDARIES if b[2]])
def test_the_edge_of_the_range_is_accepted(outside, key, edge):
    cfg = load_config(None, edge, check_paths=False)
    section, _, name = _key(edge[-1]).partition(".")
    node = getattr(cfg, section)
    for part in name.split("."):
        node = getattr(node, part) if not isinstance(node, dict) else node[part]
    assert node is not None


@pytest.mark.parametrize("override,key", [
    ("optim.weight_decay=.inf", "optim.weight_decay"), ("optim.max_grad_norm=.inf", "optim.max_grad_norm"),
    ("deepspeed.reduce_bucket_size=.inf", "deepspeed.reduce_bucket_size"),
    ("tune.driver_resources={CPU: .inf}", "tune.driver_resources.CPU"),
    ("tune.search.weight_decay=[0.1, .inf]", "tune.search.weight_decay[1]"),
    ("merge.memory_gb=.inf", "merge.memory_gb"), ("merge.verify_noise_factor=.inf", "merge.verify_noise_factor"),
])
def test_infinite_values_pass_no_range_check(override, key):
    problems = _problems([override])
    assert problems == [f"{key}: must be a finite number, got inf"], problems


def test_nan_is_named_by_its_key_path():
    problems = _problems(["optim.lr=.nan", "scaling.cpus_per_worker=.nan"])
    assert "optim.lr: must be a finite number, got nan" in problems
    assert "scaling.cpus_per_worker: must be a finite number, got nan" in problems
    assert all(p.split(":")[0] in ("optim.lr", "scaling.cpus_per_worker") for p in problems)


def test_every_numeric_field_has_a_boundary_row():
    """A numeric field added later without a range rule (and a row here) fails this test."""
    import dataclasses
    import typing

    from raytune_minicpmv.config import Config

    def numeric_keys(cls, prefix):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                yield from numeric_keys(tp, f"{prefix}{f.name}.")
                continue
            args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            inner = typing.get_args(args[0]) if typing.get_origin(args[0]) in (list, dict) else ()
            if any(a in (int, float) for a in (*args, *inner)) and bool not in args:
                yield prefix + f.name

    covered = {_key(o) for outside, _, _ in BOUNDARIES for o in outside}
    missing = sorted(set(numeric_keys(Config, "")) - covered)
    assert missing == [], f"no boundary row for {missing}"
