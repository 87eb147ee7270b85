"""Config validation: every rule appends a problem naming the key path and the fix; one `ConfigError` lists them all.

    problems = validate(cfg)                 # [] when the config is usable; check_paths=False skips the filesystem
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import fields

from ..path_checks import checkpoint_problems, packing_problems, storage_problems
from .schema import Config, is_uri


# --------------------------------------------------------------------------------------------------------------
# Validation: every rule appends a problem naming the key and the fix.

LLM_TYPES = ("minicpm", "llama3", "qwen2", "qwen")


def validate(cfg: Config, check_paths: bool = True) -> list[str]:
    p: list[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            p.append(msg)

    p += _non_finite(cfg, "")  # NaN / inf pass some range checks (inf >= 0); no field means them
    need(bool(cfg.run.name) and "/" not in cfg.run.name, "run.name: must be a non-empty name without '/'")
    need(0 <= cfg.run.seed < 2**32, "run.seed: must be in [0, 2**32) (the range every RNG here accepts)")
    need(cfg.ray.num_cpus is None or cfg.ray.num_cpus >= 1, "ray.num_cpus: must be >= 1 or unset")
    need(cfg.ray.worker_group_start_timeout_s > 0, "ray.worker_group_start_timeout_s: must be > 0 (seconds)")
    need(cfg.ray.driver_resource.isidentifier() or cfg.ray.driver_resource == "",
         "ray.driver_resource: must be a resource name like trial_driver (or \"\" to disable)")
    # data
    d = cfg.data
    need(d.llm_type is None or d.llm_type in LLM_TYPES,
         f"data.llm_type: {d.llm_type!r} is not one of {', '.join(LLM_TYPES)} (or leave it unset)")
    need(d.model_max_length >= 16, "data.model_max_length: must be >= 16")
    need(1 <= d.max_slice_nums <= 36, "data.max_slice_nums: must be in [1, 36] (MiniCPM-V uses 9)")
    need(0.0 <= d.max_skip_fraction <= 1.0, "data.max_skip_fraction: must be in [0, 1]")
    need(d.map_batch_size >= 1, "data.map_batch_size: must be >= 1")
    need(0 < d.num_cpus_per_task <= 64, "data.num_cpus_per_task: must be in (0, 64]")
    need(d.max_tasks is None or d.max_tasks >= 1, "data.max_tasks: must be >= 1 or unset")
    if check_paths:
        if d.preprocessed:
            need(_exists(cfg.data_output_path),
                 f"data.output_path: {cfg.data_output_path} does not exist (run `raytune-minicpmv preprocess` "
                 "first, or set data.preprocessed=false)")
        else:
            need(bool(d.train_path), "data.train_path: required (a JSON, JSONL or Parquet file)")
            need(not d.train_path or _exists(d.train_path), f"data.train_path: {d.train_path} does not exist")
            need(not d.train_path or not _is_dir(d.train_path),
                 f"data.train_path: {d.train_path} is a directory; give one .json, .jsonl or .parquet file")
        need(d.eval_path is None or _exists(d.eval_path), f"data.eval_path: {d.eval_path} does not exist")
        need(d.eval_path is None or not _is_dir(d.eval_path),
             f"data.eval_path: {d.eval_path} is a directory; give one .json, .jsonl or .parquet file")
        need(d.tokenizer_path is None or _exists(d.tokenizer_path),
             f"data.tokenizer_path: {d.tokenizer_path} does not exist")
        p += storage_problems(cfg.run.storage_path)
    # model
    m = cfg.model
    if check_paths:
        need(bool(m.path) or d.tokenizer_path is not None,
             "model.path: required (a checkpoint directory; `raytune-minicpmv demo` builds a tiny one)")
        need(not m.path or _exists(m.path), f"model.path: {m.path} does not exist")
        p += checkpoint_problems(m.path, m.family)
    need(not (m.vision_varlen is True and m.family == "minicpmv2_5"),
         "model.vision_varlen: true is not available for minicpmv2_5 (its vision tower attends the crops' padding, "
         "as the remote code does); use auto or false")
    need(not (m.liger is True and not cfg.scaling.use_gpu),
         "model.liger: true needs GPUs (Liger Kernel is Triton/CUDA); set scaling.use_gpu=true or model.liger=auto")
    need(not (m.vision_attention == "varlen" and not (cfg.scaling.use_gpu and m.dtype in ("bf16", "fp16"))),
         "model.vision_attention: varlen needs GPUs and model.dtype bf16 or fp16 (torch's varlen_attn); use auto "
         "or grouped")
    need(m.vision_chunk_crops is None or m.vision_chunk_crops >= 1,
         "model.vision_chunk_crops: must be >= 1 (or null: every packed crop of a batch in one call)")
    need(not (m.vision_attention == "varlen" and m.vision_varlen is False),
         "model.vision_attention: varlen attends packed crops; it needs model.vision_varlen auto or true")
    p += _quantization_problems(cfg, check_paths)
    p += _family_problems(cfg)
    p += _unavailable_family(cfg)
    # trainable / lora
    t = cfg.trainable
    if t.preset is None:
        need(any(v in ("full", "lora") for v in (t.vision, t.resampler, t.llm, t.embed_tokens)),
             "trainable: every part is frozen; make at least one of vision/resampler/llm/embed_tokens full or lora")
    lo = cfg.lora
    need(lo.r >= 1, "lora.r: must be >= 1")
    need(lo.alpha >= 1, "lora.alpha: must be >= 1")
    need(0.0 <= lo.dropout < 1.0, "lora.dropout: must be in [0, 1)")
    for name in ("target_modules", "vision_target_modules"):
        try:
            __import__("re").compile(getattr(lo, name))
        except Exception as e:  # noqa: BLE001 - report any regex error
            p.append(f"lora.{name}: not a valid regex ({e})")
    # optim
    o = cfg.optim
    need(0 < o.lr < 1, "optim.lr: must be in (0, 1)")
    need(o.weight_decay >= 0, "optim.weight_decay: must be >= 0")
    need(0 <= o.adam_beta1 < 1, "optim.adam_beta1: must be in [0, 1)")
    need(0 <= o.adam_beta2 < 1, "optim.adam_beta2: must be in [0, 1)")
    need(o.adam_eps > 0, "optim.adam_eps: must be > 0")
    need(o.max_grad_norm >= 0, "optim.max_grad_norm: must be >= 0 (0 disables clipping)")
    need(0 <= o.warmup_ratio < 1, "optim.warmup_ratio: must be in [0, 1)")
    need(o.warmup_steps is None or 0 <= o.warmup_steps < cfg.train.max_steps,
         "optim.warmup_steps: must be in [0, train.max_steps)")
    need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio: must be in [0, 1]")
    # train
    tr = cfg.train
    need(tr.max_steps >= 1, "train.max_steps: must be >= 1")
    need(tr.micro_batch_size >= 1, "train.micro_batch_size: must be >= 1")
    p += _batching_problems(cfg)
    need(tr.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps: must be >= 1")
    need(tr.eval_steps >= 1, "train.eval_steps: must be >= 1")
    need(tr.logging_steps >= 1, "train.logging_steps: must be >= 1")
    need(tr.save_steps >= 1, "train.save_steps: must be >= 1")
    need(tr.save_total_limit >= 1, "train.save_total_limit: must be >= 1")
    need(tr.max_failures >= -1, "train.max_failures: must be >= -1 (-1 retries forever)")
    for r in tr.report_to:
        need(r in ("tensorboard", "mlflow", "wandb"), f"train.report_to: {r!r} is not tensorboard, mlflow or wandb")
    # deepspeed
    ds = cfg.deepspeed
    need(not (ds.offload_param == "cpu" and ds.zero_stage not in (3, "auto")),
         "deepspeed.offload_param: parameter offload needs zero_stage 3 (or auto)")
    need(not (ds.offload_optimizer == "cpu" and ds.zero_stage in (0, 1)),
         "deepspeed.offload_optimizer: needs zero_stage 2, 3 or auto")
    need(0.1 <= ds.memory_fraction <= 1.0, "deepspeed.memory_fraction: must be in [0.1, 1]")
    need(tr.profile_steps >= 0, "train.profile_steps: must be >= 0 (0: no profile)")
    need(not (m.dtype == "fp16" and not cfg.scaling.use_gpu), "model.dtype: fp16 needs GPUs; use bf16 or fp32 on CPU")
    need(ds.param_persistence_threshold >= 0, "deepspeed.param_persistence_threshold: must be >= 0")
    need(ds.reduce_bucket_size > 0, "deepspeed.reduce_bucket_size: must be > 0")
    need(4 <= ds.fp16_initial_scale_power <= 32, "deepspeed.fp16_initial_scale_power: must be in [4, 32]")
    need(tr.eval_max_batches is None or tr.eval_max_batches >= 1, "train.eval_max_batches: must be >= 1 or unset")
    need(tr.fail_at_step is None or 1 <= tr.fail_at_step <= tr.max_steps,
         "train.fail_at_step: must be in [1, train.max_steps] or unset (a test hook)")
    # scaling
    sc = cfg.scaling
    need(sc.num_workers >= 1, "scaling.num_workers: must be >= 1")
    need(sc.cpus_per_worker > 0, "scaling.cpus_per_worker: must be > 0")
    # tune
    tu = cfg.tune
    need(tu.num_samples >= 1, "tune.num_samples: must be >= 1")
    need(len(tu.search.lr) >= 1, "tune.search.lr: give [low, high] (loguniform) or grid values")
    if tu.search.lr_sampler == "loguniform":
        need(len(tu.search.lr) == 2 and 0 < tu.search.lr[0] < tu.search.lr[1],
             "tune.search.lr: loguniform needs [low, high] with 0 < low < high")
    need(all(0 < v < 1 for v in tu.search.lr), "tune.search.lr: learning rates must be in (0, 1)")
    need(tu.grace_period >= 1, "tune.grace_period: must be >= 1")
    need(tu.reduction_factor >= 2, "tune.reduction_factor: must be >= 2")
    need(tu.max_t is None or tu.max_t >= tu.grace_period, "tune.max_t: must be >= tune.grace_period")
    need(tu.max_concurrent_trials is None or tu.max_concurrent_trials >= 1, "tune.max_concurrent_trials: must be >= 1")
    need(tu.max_failures >= -1, "tune.max_failures: must be >= -1 (-1 retries forever)")
    sp = tu.search
    need(sp.weight_decay is None or (len(sp.weight_decay) >= 1 and all(v >= 0 for v in sp.weight_decay)),
         "tune.search.weight_decay: grid values must be >= 0 (at least one, or unset)")
    need(sp.lora_r is None or (len(sp.lora_r) >= 1 and all(v >= 1 for v in sp.lora_r)),
         "tune.search.lora_r: grid values must be >= 1 (at least one, or unset)")
    need(sp.warmup_ratio is None or (len(sp.warmup_ratio) >= 1 and all(0 <= v < 1 for v in sp.warmup_ratio)),
         "tune.search.warmup_ratio: grid values must be in [0, 1) (at least one, or unset)")
    need(all(v > 0 for v in cfg.scaling.resources_per_worker.values())
         and not {"CPU", "GPU"} & set(cfg.scaling.resources_per_worker),
         "scaling.resources_per_worker: custom resources only (CPU/GPU come from cpus_per_worker/use_gpu), "
         "every amount > 0")
    need(all(v > 0 for v in tu.driver_resources.values()),
         "tune.driver_resources: every amount must be > 0 (Ray rejects an empty request)")
    p += _generation_problems(cfg)
    # merge
    mg = cfg.merge
    need(mg.verify_samples >= 0, "merge.verify_samples: must be >= 0")
    need(mg.verify_atol is None or mg.verify_atol > 0, "merge.verify_atol: must be > 0 (or unset to measure it)")
    need(mg.verify_noise_factor >= 1, "merge.verify_noise_factor: must be >= 1 (a correct merge has 1 x the noise)")
    need(mg.num_cpus > 0, "merge.num_cpus: must be > 0")
    shard = __import__("re").fullmatch(r"(?i)\s*(\d+(\.\d+)?)\s*(KB|MB|GB|TB)\s*", mg.max_shard_size)
    need(shard is not None and float(shard.group(1)) > 0,
         f"merge.max_shard_size: {mg.max_shard_size!r} is not a size > 0 like 500MB or 2GB")
    need(mg.memory_gb is None or mg.memory_gb > 0, "merge.memory_gb: must be > 0 (or unset to estimate it)")
    need(mg.num_gpus >= 0 and (mg.num_gpus <= 1 or mg.num_gpus == int(mg.num_gpus)),
         "merge.num_gpus: must be >= 0, and a whole number above 1 (Ray's rule for fractional GPUs)")
    return p


def _batching_problems(cfg: Config) -> list[str]:
    """train.max_tokens_per_batch, data.packing and model.packed_attention: every conflict at once."""
    p: list[str] = []
    tr, budget = cfg.train, cfg.train.max_tokens_per_batch
    if budget is not None:
        if budget < cfg.data.model_max_length:
            p.append(f"train.max_tokens_per_batch: {budget} is below data.model_max_length "
                     f"({cfg.data.model_max_length}); the longest sample must fit one micro-batch, so raise it "
                     "(or lower data.model_max_length)")
        if tr.micro_batch_size != 1:
            p.append(f"train.micro_batch_size: {tr.micro_batch_size} together with train.max_tokens_per_batch; "
                     "they are alternatives (the budget decides how many samples a micro-batch holds): "
                     "leave micro_batch_size at 1 or unset max_tokens_per_batch")
    if cfg.data.packing:
        if budget is None:
            p.append("data.packing: needs train.max_tokens_per_batch (the length of a packed row), e.g. 8192")
        p += packing_problems(cfg.model.family)
    if cfg.model.packed_attention in ("flex", "varlen") and not cfg.scaling.use_gpu:
        p.append(f"model.packed_attention: {cfg.model.packed_attention} runs on GPUs only; use sdpa or auto on CPU")
    if cfg.model.packed_attention == "varlen" and cfg.model.dtype == "fp32":
        p.append("model.packed_attention: varlen runs in bf16/fp16 only; use sdpa or auto with model.dtype=fp32")
    return p


def _quantization_problems(cfg: Config, check_paths: bool) -> list[str]:
    """model.quantization against the rest: what a bitsandbytes base cannot do, refused before any worker starts."""
    q, t, ds = cfg.model.quantization, cfg.trainable, cfg.deepspeed
    p = []
    if check_paths:  # also with `none`: a pre-quantized model.path must be named as such
        from ..path_checks import quantized_checkpoint_problems

        p += quantized_checkpoint_problems(cfg.model.path, q, t.vision)
    if q == "none":
        return p
    llm = "lora" if t.preset == "seed_compat" else t.llm
    if llm == "full":
        p.append(f"trainable.llm: full fine-tuning of an {q}-quantized LLM is not possible (its weights are packed "
                 "integers without gradients); use trainable.llm=lora (QLoRA) or model.quantization=none")
    if ds.zero_stage == 3:
        p.append(f"deepspeed.zero_stage: 3 partitions every parameter into flat shards, which loses the "
                 f"bitsandbytes layout (packed weights + quant state) of an {q} base; use zero_stage 0, 1, 2 or auto "
                 "(auto never picks 3 with a quantized base), or model.quantization=none")
    if ds.offload_param == "cpu":
        p.append("deepspeed.offload_param: parameter offload needs ZeRO-3, which a quantized base does not support; "
                 "set offload_param=none")
    return p


BUILTIN_GENERATION_METRICS = ("exact_match", "token_f1")  # higher is better


def _generation_problems(cfg: Config) -> list[str]:
    """eval.* (generation metrics) and generate.* (decoding); tune.metric naming a generation metric."""
    import re

    p: list[str] = []
    ev, g = cfg.eval, cfg.generate
    for name in ev.generation_metrics:
        if name not in BUILTIN_GENERATION_METRICS and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", name):
            p.append(f"eval.generation_metrics: {name!r} is not exact_match, token_f1 or a 'module:function' "
                     "(a function (prediction, reference) -> float)")
    names = [n.rsplit(":", 1)[-1] for n in ev.generation_metrics]
    if len(set(names)) != len(names):
        p.append(f"eval.generation_metrics: {ev.generation_metrics} reports two metrics under one name "
                 "(eval_<name>); give each a distinct name")
    if ev.generation_metrics and not cfg.data.eval_path and not cfg.data.preprocessed:
        p.append("eval.generation_metrics: needs an eval split; set data.eval_path")
    if ev.generation_max_samples < 1:
        p.append("eval.generation_max_samples: must be >= 1")
    if ev.generation_batch_size < 1:
        p.append("eval.generation_batch_size: must be >= 1")
    if ev.generation_max_new_tokens is not None and ev.generation_max_new_tokens < 1:
        p.append("eval.generation_max_new_tokens: must be >= 1 or unset")
    metric = cfg.tune.metric
    if metric.startswith("eval_") and metric[5:] in BUILTIN_GENERATION_METRICS:
        if metric[5:] not in ev.generation_metrics:
            p.append(f"tune.metric: {metric} is only reported with {metric[5:]} in eval.generation_metrics")
        if cfg.tune.mode != "max":
            p.append(f"tune.mode: {metric} is better when higher; set tune.mode=max")
    for key, ok, rule in (("max_new_tokens", g.max_new_tokens >= 1, ">= 1"),
                          ("temperature", g.temperature > 0, "> 0"),
                          ("top_p", 0 < g.top_p <= 1, "in (0, 1]"), ("top_k", g.top_k >= 0, ">= 0 (0 disables)"),
                          ("repetition_penalty", g.repetition_penalty > 0, "> 0 (1 disables)"),
                          ("seed", g.seed is None or 0 <= g.seed < 2**32, "in [0, 2**32) or unset"),
                          ("batch_size", g.batch_size >= 1, ">= 1"), ("num_actors", g.num_actors >= 1, ">= 1"),
                          ("num_cpus_per_actor", g.num_cpus_per_actor > 0, "> 0"),
                          ("num_gpus_per_actor", g.num_gpus_per_actor is None or g.num_gpus_per_actor >= 0,
                           ">= 0 or unset")):
        if not ok:
            p.append(f"generate.{key}: must be {rule}")
    return p


def _is_dir(path: str) -> bool:
    return not is_uri(path) and os.path.isdir(path)


def _non_finite(obj, prefix: str) -> list[str]:
    """Every float anywhere in the config (lists and mappings too) that is NaN or infinite, by key path."""
    if dataclasses.is_dataclass(obj):
        return [m for f in fields(obj) for m in _non_finite(getattr(obj, f.name), f"{prefix}.{f.name}".lstrip("."))]
    if isinstance(obj, list):
        return [m for i, v in enumerate(obj) for m in _non_finite(v, f"{prefix}[{i}]")]
    if isinstance(obj, dict):
        return [m for k, v in obj.items() for m in _non_finite(v, f"{prefix}.{k}")]
    if isinstance(obj, float) and not math.isfinite(obj):
        return [f"{prefix}: must be a finite number, got {obj}"]
    return []


def _exists(path: str) -> bool:
    if is_uri(path):
        return True  # remote storage is checked when it is opened
    return os.path.exists(path)


def _unavailable_family(cfg: Config) -> list[str]:
    """A family this install cannot run (e.g. 4.x on a transformers before 5.19), said before any work starts."""
    if not str(cfg.model.family).startswith("minicpmv4"):  # only 4.x depends on the transformers release
        return []
    from ..models.registry import FAMILIES

    fam = FAMILIES.get(cfg.model.family)
    return [f"model.family: {fam.name} {fam.blocked}; pip install -U 'transformers>=5.19'"] \
        if fam is not None and fam.blocked else []


def _family_problems(cfg: Config) -> list[str]:
    """Settings that only some model families support (imports the model registry only when one is set)."""
    m, p = cfg.model, []
    zero3 = cfg.deepspeed.zero_stage == 3 or cfg.deepspeed.offload_param == "cpu"  # parameter offload is ZeRO-3
    if m.downsample_mode == "16x" and not zero3:  # nothing family-specific (packing: _batching_problems)
        return p
    from ..models.registry import FAMILIES
    from ..models.zero3 import zero3_refusal

    fam = FAMILIES.get(m.family)
    if fam is None:
        return p  # an unknown family is reported by the train/preprocess checks, with the list of families
    if m.downsample_mode != "16x" and not fam.hf_native:
        p.append(f"model.downsample_mode: {m.downsample_mode!r} is a MiniCPM-V 4.6/4.7 setting; {m.family} has a "
                 "resampler with a fixed query count (leave model.downsample_mode at 16x)")
    why_not_zero3 = zero3_refusal(m.family, cfg.trainable) if zero3 else None
    if why_not_zero3:
        p.append(f"deepspeed.zero_stage: 3 with trainable.llm=frozen is not supported for {m.family} "
                 f"({why_not_zero3}); use deepspeed.zero_stage=2 (or auto), which holds these 1.3-1.6 B models on any current card, or "
                 "train the LLM (lora / full)")
    return p


def resolve_llm_type(cfg: Config) -> str:
    """The chat template family: data.llm_type if set, else the model family's default. `qwen` == `qwen2`."""
    if cfg.data.llm_type:
        return "qwen2" if cfg.data.llm_type == "qwen" else cfg.data.llm_type
    return {"minicpmv2_0": "minicpm", "minicpmv2_5": "llama3"}.get(cfg.model.family, "qwen2")
