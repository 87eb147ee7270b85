"""The config schema: one frozen dataclass per concern (`run`, `ray`, `data`, `model`, `trainable`, `lora`, `optim`,
`train`, `eval`, `generate`, `deepspeed`, `scaling`, `tune`, `merge`) and the `Config` that holds them. Every field has
its default and a comment here; YAML is only their serialization (`loading.py`), the rules between fields are
`validation.py`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional


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
    # the autoscaler's cluster config (YAML/JSON: available_node_types, max_workers): what the cluster can grow to.
    # None: the autoscaler's own report (autoscaler v2, KubeRay), else ~/ray_bootstrap_config.yaml on the driver's
    # node (the head of `ray up cluster.yaml`), else the cluster is taken as fixed; "": never autoscaling
    autoscaling_config: Optional[str] = None


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
    # train: several samples per micro-batch row, up to train.max_tokens_per_batch tokens (needed), first-fit-
    # decreasing over a window of the stream; attention never crosses a sample (docs/TRAINING.md "Packing")
    packing: bool = False


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
    downsample_mode: Literal["16x", "4x"] = "16x"  # 4.6/4.7: visual tokens = patches/16 or /4 (processor + model)
    # the LLM's attention over packed rows (data.packing): sdpa (block-diagonal causal mask; the exact CPU path),
    # flex (FlexAttention document mask, GPU), varlen (torch varlen_attn, GPU), auto: varlen on GPUs in bf16/fp16
    # (measured fastest, docs/PERFORMANCE.md), else sdpa; docs/TRAINING.md "Packing"
    packed_attention: Literal["auto", "sdpa", "flex", "varlen"] = "auto"
    # kernel levers (models/kernels.py, docs/PERFORMANCE.md); auto: on where exact and available
    vision_varlen: Literal[True, False, "auto"] = "auto"  # crops packed without padding (2.6; 2.5: off)
    fused_ce: Literal[True, False, "auto"] = "auto"  # training loss from hidden states: no [tokens, vocab] logits
    liger: Literal[True, False, "auto"] = "auto"  # Liger Kernel (extra `gpu`): RMSNorm/SwiGLU/RoPE + fused CE
    compile_vision: bool = False  # torch.compile of the vision layers' per-token parts (first steps compile)
    # crops per vision-tower call. None: packed crops (vision_varlen) go through the tower in ONE call per batch (one
    # set of kernel launches; the memory is the same, training keeps every crop's activations anyway), padded crops
    # in chunks of the checkpoint's vision_batch_size (the padded batch and its mask grow with the chunk)
    vision_chunk_crops: Optional[int] = None
    # the packed vision tower's attention (vision_varlen on): grouped (one SDPA call per run of equal-length crops;
    # the exact CPU path) or varlen (one torch varlen_attn call per layer for all crops: CUDA, bf16/fp16, no
    # attention dropout); auto: grouped (with flash SDPA it measured faster than varlen, docs/PERFORMANCE.md)
    vision_attention: Literal["auto", "grouped", "varlen"] = "auto"
    # torch SDPA's kernel family on CUDA: cudnn (torch's first choice on Hopper; it builds a cuDNN graph for every
    # new shape, and training batches change shape every step), flash (FlashAttention-2 in torch: no per-shape
    # build); auto: flash on CUDA (measured, docs/PERFORMANCE.md). Process-wide in the train worker
    sdpa_kernel: Literal["auto", "cudnn", "flash"] = "auto"
    # bitsandbytes base weights (QLoRA; the `qlora` extra): nf4 (4-bit NormalFloat, double-quantized) or int8
    # LLM linear layers (vision tower, resampler, embeddings, lm_head stay in model.dtype); a pre-quantized
    # checkpoint (config.json quantization_config) must be named with its method. Needs trainable.llm lora or frozen,
    # and ZeRO 0-2 (docs/TRAINING.md "QLoRA")
    quantization: Literal["none", "nf4", "int8"] = "none"


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
    # a token budget per micro-batch instead of a fixed micro_batch_size (leave that at 1): padded tokens
    # (samples × longest) without packing, the packed row's length with data.packing; >= data.model_max_length
    max_tokens_per_batch: Optional[int] = None
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
    # on CUDA, pin each micro-batch in the collate thread: the step's copies to the GPU are then queued, not staged
    # by the host (train/worker.pinned)
    pin_memory: bool = True


@dataclass(frozen=True)
class EvalConfig:
    # metrics of GENERATED answers on the eval split, reported as eval_<name> next to eval_loss at every evaluation:
    # exact_match, token_f1 (SQuAD-style, on normalized text) and/or "module:function", a function
    # (prediction: str, reference: str) -> float averaged over the samples (reported as eval_<function>)
    generation_metrics: list[str] = field(default_factory=list)
    generation_max_samples: int = 32  # eval records generated per evaluation, over all workers (the first ones)
    generation_batch_size: int = 4  # records per generate call on each worker
    generation_max_new_tokens: Optional[int] = None  # None: generate.max_new_tokens


@dataclass(frozen=True)
class GenerateConfig:
    # decoding of `chat`, `predict` and the eval generation metrics (greedy unless do_sample)
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.7  # do_sample only (the official chat()'s sampling defaults: 0.7 / 0.8 / 100)
    top_p: float = 0.8  # do_sample only
    top_k: int = 100  # do_sample only; 0 disables
    repetition_penalty: float = 1.0  # > 1 discourages repeating a generated token (official chat: 1.05)
    seed: Optional[int] = None  # sampling seed (None: run.seed)
    batch_size: int = 4  # predict: records per generate call
    num_actors: int = 1  # predict: model replicas (Ray Data actors); `predict --actors N` overrides
    num_cpus_per_actor: float = 1.0  # predict: CPUs of one actor (its torch threads on CPU)
    num_gpus_per_actor: Optional[float] = None  # predict: None: 1 when the cluster has GPUs, else 0


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
    # train, ZeRO-3, 2.x families: gather each LLM decoder layer's and vision encoder layer's parameters as one unit
    # (DeepSpeed leaf modules) instead of each linear, norm and LoRA matrix on its own: 11-15x fewer ZeRO-3 hook
    # calls per layer (models/zero3.py); false: DeepSpeed's per-module gathering
    zero3_leaf_layers: bool = True
    # train, ZeRO-3: DeepSpeed's own linear (a Python autograd function in place of torch's F.linear, process-wide)
    # that keeps a layer's gathered weight from being held for the backward. auto: off when every layer is
    # recomputed (model.gradient_checkpointing resolves to true: nothing is held then, and its per-call Python cost
    # was ~60 % of ZeRO-3's host overhead in a CPU profile, docs/PERFORMANCE.md), on otherwise
    memory_efficient_linear: Literal["auto", True, False] = "auto"
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
    # extra Ray resources per train worker, e.g. {gpu_standin: 1} (a custom resource that stands in for a GPU, so
    # CPU workers land on the nodes that advertise it: the simulated autoscaling cluster of docs/CLUSTER.md)
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    # the driver checks the cluster can hold the workers: on an autoscaling cluster against what it can grow to
    # (ray.autoscaling_config), with a warning while they are not up yet; false skips the check
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
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
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
        extra = dict(self.scaling.resources_per_worker)
        if self.scaling.use_gpu:
            return {"CPU": self.scaling.cpus_per_worker, "GPU": 1.0, **extra}
        return {"CPU": self.scaling.cpus_per_worker, **extra}

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


