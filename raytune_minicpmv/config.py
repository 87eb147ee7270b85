"""Typed configuration: one frozen dataclass per concern, YAML as their serialization.

    cfg = load_config("configs/demo.yaml", ["train.max_steps=10", "optim.lr=3e-4"])

`load_config` reads the YAML, applies dotted ``key.path=value`` overrides (values parsed as YAML scalars),
builds the dataclasses and validates them. Every problem (unknown key, wrong type, out-of-range value, missing
path, inconsistent combination) is collected and raised at once as a `ConfigError` naming the key path and the
fix. Relative paths in a config file resolve against the file's directory, so a config works from any CWD;
relative paths given as overrides (on the command line) resolve against the current directory, as a shell would.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .path_checks import checkpoint_problems, data_file_problems, storage_problems


class ConfigError(ValueError):
    """Raised with every problem found in a config, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n  - " + "\n  - ".join(problems))


# --------------------------------------------------------------------------------------------------------------
# Sections. Field comments are the user documentation (docs/CONFIG.md is generated from nothing else).


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"  # stable run name: reusing name + storage_path resumes that run
    storage_path: str = "./runs"  # must be shared storage (NFS path or s3://, gs://) on multi-node clusters
    seed: int = 42


@dataclass(frozen=True)
class RayConfig:
    address: Optional[str] = None  # None: RAY_ADDRESS env or a new local Ray; "auto": the running cluster
    num_cpus: Optional[int] = None  # only for a new local Ray
    include_dashboard: bool = True  # Tune+ASHA needs the State API to free stopped trials' placement groups
    worker_group_start_timeout_s: float = 900.0  # long enough for the autoscaler to bring up GPU nodes
    driver_resource: str = "trial_driver"  # custom resource of the CPU head; drivers/merge/job ask for 1 if present


@dataclass(frozen=True)
class DataConfig:
    train_path: str = ""  # JSON array, JSONL or Parquet in the MiniCPM-V fine-tune format
    eval_path: Optional[str] = None
    llm_type: Optional[str] = None  # minicpm | llama3 | qwen2 (alias qwen); None: from the model family
    model_max_length: int = 2048
    max_slice_nums: int = 9
    on_bad_record: Literal["error", "skip"] = "error"
    max_skip_fraction: float = 0.05  # with on_bad_record=skip: fail when more than this fraction is skipped
    output_path: Optional[str] = None  # preprocess output (Parquet shards + report); None: <storage>/<name>/data
    preprocessed: bool = False  # train/tune read output_path as already-preprocessed Parquet
    map_batch_size: int = 8  # records per map_batches call
    num_cpus_per_task: float = 0.5  # CPU per preprocessing task; keep it fractional next to CPU train workers
    max_tasks: Optional[int] = None  # cap on concurrent preprocessing tasks (None: Ray decides)
    tokenizer_path: Optional[str] = None  # None: the model checkpoint directory


@dataclass(frozen=True)
class ModelConfig:
    family: str = "minicpmv2_6"
    path: str = ""  # checkpoint directory (config.json + safetensors + tokenizer)
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    trust_remote_code: bool = False  # only for checkpoints of families we do not implement natively
    # true | false | vision | llm (checkpoint only that tower's layers) | auto: the cheapest that fits the card,
    # from the engine's memory estimate (printed by the worker; see docs/TRAINING.md "Engine choice")
    gradient_checkpointing: Literal[True, False, "auto", "vision", "llm"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


@dataclass(frozen=True)
class TrainableConfig:
    preset: Optional[Literal["seed_compat"]] = None  # reproduce the official LoRA script's trainable set
    vision: Literal["full", "lora", "frozen"] = "frozen"
    resampler: Literal["full", "frozen"] = "full"
    llm: Literal["full", "lora", "frozen"] = "lora"
    embed_tokens: Literal["full", "frozen"] = "frozen"


@dataclass(frozen=True)
class LoraConfig:
    r: int = 64
    alpha: int = 64
    dropout: float = 0.05
    # regex over full module names (re.fullmatch, as PEFT does for a string)
    target_modules: str = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    vision_target_modules: str = r"vpm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.01
    warmup_steps: Optional[int] = None  # overrides warmup_ratio
    min_lr_ratio: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 1000  # optimizer steps (every rank does exactly this many)
    micro_batch_size: int = 1  # samples per GPU per forward
    gradient_accumulation_steps: int = 1
    eval_steps: int = 100
    eval_max_batches: Optional[int] = None  # None: the whole eval split
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int = 2
    max_failures: int = 0  # Ray Train retries of the worker group, resuming from the last checkpoint
    fail_at_step: Optional[int] = None  # test hook: raise once at this step to exercise resume
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, mlflow, wandb
    # > 0: torch-profile this many engine steps (micro-batches; = optimizer steps without accumulation) after 3
    # warm-up steps on every rank; rank 0 prints the top
    # kernels and the GPU idle %, each rank writes <run dir>/profile/trace_rank<R>.json (`train --profile`)
    profile_steps: int = 0


@dataclass(frozen=True)
class DeepSpeedConfig:
    # 0 (plain data parallel), 1 (optimizer state partitioned), 2 (+ gradients), 3 (+ parameters), or auto: the
    # lowest stage whose estimated memory fits memory_fraction of the card (printed with the estimate)
    zero_stage: Literal[0, 1, 2, 3, "auto"] = "auto"
    memory_fraction: float = 0.85  # auto choices: use at most this fraction of the card's (or host's) memory
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_param: Literal["none", "cpu"] = "none"  # ZeRO-3 only
    overlap_comm: bool = True
    reduce_bucket_size: float = 5e8
    # train: ZeRO-3 keeps params smaller than this (numel) unpartitioned on every rank (less all-gather traffic)
    param_persistence_threshold: float = 1e5
    # train: fp16 only, dynamic loss scaling starts at 2**this
    fp16_initial_scale_power: int = 16
    # train: with offload_optimizer=cpu use DeepSpeedCPUAdam (JIT-compiled once, ~2 min); false: torch AdamW on CPU
    cpu_adam: bool = True


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 1  # one GPU per worker
    use_gpu: bool = True
    cpus_per_worker: float = 8.0  # sets the worker's thread count (OMP_NUM_THREADS); 1 starves the data loader
    accelerator_type: Optional[str] = None  # e.g. H100: lands workers on that card type
    # train: the driver checks ray.cluster_resources() covers the workers; false on autoscaling clusters whose
    # GPU nodes are not up yet
    check_resources: bool = True


@dataclass(frozen=True)
class SearchSpaceConfig:
    lr: list[float] = field(default_factory=lambda: [1e-5, 1e-3])  # [low, high] for loguniform, values for grid
    lr_sampler: Literal["loguniform", "grid"] = "loguniform"
    weight_decay: Optional[list[float]] = None  # grid values
    lora_r: Optional[list[int]] = None  # grid values
    warmup_ratio: Optional[list[float]] = None  # grid values


@dataclass(frozen=True)
class TuneConfig:
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    num_samples: int = 8  # samples per grid point
    search: SearchSpaceConfig = field(default_factory=SearchSpaceConfig)
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = 1  # in reports (evaluations)
    reduction_factor: int = 2
    max_t: Optional[int] = None  # in reports; None: max_steps // eval_steps
    max_concurrent_trials: Optional[int] = None  # None: cluster GPUs // GPUs per trial
    driver_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 0.05})
    max_failures: int = 0  # Tune retries of a trial driver (Train resumes from its checkpoint)


@dataclass(frozen=True)
class MergeConfig:
    enabled: bool = True  # tune: merge the best trial when the search ends
    output_path: Optional[str] = None  # None: <storage>/<name>/merged
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    max_shard_size: str = "2GB"  # limit per output safetensors file (KB/MB/GB/TB)
    verify_samples: int = 2  # sample records run through adapter-on-base and the merged model; 0 skips the check
    # max |Δ logit| merged vs adapter-on-base; None: measured on the model (verify_noise_factor × the noise of PEFT
    # folding the same adapter in the same dtype, at least 2 dtype steps at the largest logit; docs/MERGE.md)
    verify_atol: Optional[float] = None
    verify_noise_factor: float = 3.0  # with verify_atol unset: how many times the measured rounding noise to allow
    num_cpus: float = 1.0
    # declared to Ray (None: the larger of 1.5 × (largest base shard + adapter) for the streaming merge and
    # 1.3 × model + adapter for the verification, which loads one model at a time)
    memory_gb: Optional[float] = None
    num_gpus: float = 0.0  # > 0: the merge task takes a GPU and runs the verification forward passes on it


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)

    # ---- derived values, one place each
    @property
    def run_dir(self) -> str:
        return join_uri(self.run.storage_path, self.run.name)

    @property
    def data_output_path(self) -> str:
        return self.data.output_path or join_uri(self.run_dir, "data")

    @property
    def merge_output_path(self) -> str:
        return self.merge.output_path or join_uri(self.run_dir, "merged")

    @property
    def worker_resources(self) -> dict[str, float]:
        """Ray resources of one train worker: one GPU + its CPUs, or (CPU-only) a CPU share that leaves room for
        Ray Data's tasks (a CPU cluster whose workers take every CPU never schedules the data pipeline)."""
        if self.scaling.use_gpu:
            return {"CPU": self.scaling.cpus_per_worker, "GPU": 1.0}
        return {"CPU": self.scaling.cpus_per_worker}

    @property
    def global_batch_size(self) -> int:
        return self.train.micro_batch_size * self.train.gradient_accumulation_steps * self.scaling.num_workers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI (s3://bucket/x) without mangling the scheme."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def is_uri(path: str) -> bool:
    return "://" in path


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                check_paths: bool = True) -> Config:
    """Read YAML (or defaults when path is None), apply ``a.b=value`` overrides, build and validate."""
    raw: dict = {}
    base_dir = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file {path} does not exist"])
        raw = _read_yaml(path)
        base_dir = path.resolve().parent
    problems: list[str] = []
    overridden: set[str] = set()
    for ov in overrides:
        _apply_override(raw, ov, problems)
        overridden.add(ov.split("=", 1)[0].strip())
    cfg = _build(Config, raw, "", problems)
    if cfg is not None:
        # file paths against the file's directory, command-line paths against the current directory
        cfg = _resolve_paths(cfg, base_dir, overridden)
        problems += validate(cfg, check_paths=check_paths)
    if problems:
        raise ConfigError(problems)
    return cfg


def _read_yaml(path: Path) -> dict:
    """The file's mapping; a syntax error is a ConfigError naming file:line:column, not a parser traceback."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        parts, first = [], None
        for text, mark in ((getattr(e, "context", None), getattr(e, "context_mark", None)),
                           (getattr(e, "problem", None), getattr(e, "problem_mark", None))):
            if text and mark is not None:
                first = first or mark
                parts.append(f"{text} (line {mark.line + 1}, column {mark.column + 1})")
        where = f"{path}:{first.line + 1}" if first is not None else str(path)
        raise ConfigError([f"{where}: YAML syntax error: {': '.join(parts) or e}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: top level must be a mapping of sections"])
    return raw


def config_from_dict(raw: dict, base_dir: str | os.PathLike | None = None, check_paths: bool = True) -> Config:
    """Same as `load_config` for an in-memory mapping (used by workers and tests)."""
    problems: list[str] = []
    cfg = _build(Config, raw, "", problems)
    if cfg is not None and base_dir is not None:
        cfg = _resolve_paths(cfg, Path(base_dir))
    if cfg is not None:
        problems += validate(cfg, check_paths=check_paths)
    if problems:
        raise ConfigError(problems)
    return cfg


def replace(cfg: Config, **sections: dict) -> Config:
    """Return a copy of cfg with some fields of some sections replaced: replace(cfg, optim={"lr": 1e-4})."""
    return dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in sections.items()})


def _apply_override(raw: dict, override: str, problems: list[str]) -> None:
    if "=" not in override:
        problems.append(f"override {override!r}: expected key.path=value")
        return
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            problems.append(f"override {override!r}: {p} is not a section")
            return
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        problems.append(f"override {override!r}: the value is not valid YAML ({getattr(e, 'problem', e)})")


def _build(cls, raw: Any, prefix: str, problems: list[str]):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        section = prefix.rstrip(".")
        problems.append(f"{section or '<top>'}: expected a section of keys, got {raw!r}"
                        + (f" (set its keys: {section}.KEY=VALUE)" if section else ""))
        return None
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in raw:
        if key not in known:
            near = _closest(key, known)
            problems.append(f"{prefix}{key}: unknown key" + (f" (did you mean {prefix}{near}?)" if near else "")
                            + f"; allowed: {', '.join(sorted(known))}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        value, ok = _coerce(hints[f.name], raw[f.name], f"{prefix}{f.name}", problems)
        if ok:
            kwargs[f.name] = value
    return cls(**kwargs)


def _coerce(tp, value, key: str, problems: list[str]):
    """Check/convert one value against a type hint. Returns (value, ok)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        built = _build(tp, value, key + ".", problems)  # None (problem reported) for e.g. the override `train=5`
        return built, built is not None
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None, True
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, problems)
    if origin is Literal:
        if value in args:
            return value, True
        problems.append(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return None, False
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {value!r}")
            return None, False
        out = [_coerce(args[0], v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return [v for v, _ in out], all(ok for _, ok in out)
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return None, False
        out = {k: _coerce(args[1], v, f"{key}.{k}", problems) for k, v in value.items()}
        return {k: v for k, (v, _) in out.items()}, all(ok for _, ok in out.values())
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), True
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value), True
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, True
    elif tp is bool:
        if isinstance(value, bool):
            return value, True
    elif tp is str:
        if isinstance(value, str):
            return value, True
    else:
        return value, True
    problems.append(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return None, False


def _closest(key: str, options: set[str]) -> Optional[str]:
    import difflib

    m = difflib.get_close_matches(key, sorted(options), n=1, cutoff=0.6)
    return m[0] if m else None


PATH_KEYS = ("run.storage_path", "data.train_path", "data.eval_path", "data.output_path", "data.tokenizer_path",
             "model.path", "merge.output_path")


def _resolve_paths(cfg: Config, base: Path, from_cwd: set[str] = frozenset()) -> Config:
    """Relative paths made absolute: against `base`, or against the CWD for the keys in `from_cwd` (overrides)."""
    sections: dict[str, dict] = {}
    for key in PATH_KEYS:
        section, name = key.split(".")
        p = getattr(getattr(cfg, section), name)
        if p and not is_uri(p) and not os.path.isabs(p):
            p = str(((Path.cwd() if key in from_cwd else base) / p).resolve())
        sections.setdefault(section, {})[name] = p
    return replace(cfg, **sections)


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
        if not d.preprocessed:
            p += data_file_problems("data.train_path", d.train_path) + data_file_problems("data.eval_path",
                                                                                          d.eval_path)
        p += storage_problems(cfg.run.storage_path)
    # model
    m = cfg.model
    if check_paths:
        need(bool(m.path) or d.tokenizer_path is not None,
             "model.path: required (a checkpoint directory; `raytune-minicpmv demo` builds a tiny one)")
        need(not m.path or _exists(m.path), f"model.path: {m.path} does not exist")
        p += checkpoint_problems(m.path, m.family)
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
    need(all(v > 0 for v in tu.driver_resources.values()),
         "tune.driver_resources: every amount must be > 0 (Ray rejects an empty request)")
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


def resolve_llm_type(cfg: Config) -> str:
    """The chat template family: data.llm_type if set, else the model family's default. `qwen` == `qwen2`."""
    if cfg.data.llm_type:
        return "qwen2" if cfg.data.llm_type == "qwen" else cfg.data.llm_type
    return {"minicpmv2_0": "minicpm", "minicpmv2_5": "llama3"}.get(cfg.model.family, "qwen2")
