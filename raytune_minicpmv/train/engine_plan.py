"""The engine for the size: resolve `deepspeed.zero_stage: auto` and `model.gradient_checkpointing: auto` from a
per-rank memory estimate, before any weight is loaded (ZeRO-3 must be known before the model is built).

    plan = plan_engine(cfg, world_size=8, capacity_bytes=80 * 2**30)   # in the worker: the card's total memory
    print(plan.describe())              # the estimate of every candidate tried and the choice
    cfg = plan.apply(cfg)               # the same config with a concrete stage and checkpointing mode

Candidates are tried from the cheapest step time upwards and the first whose estimate fits
`deepspeed.memory_fraction` × capacity wins: no recompute before recompute, and among those ZeRO stage 0, 1, 2 in
that order; ZeRO-3 (each layer's weights gathered in every forward and backward, about half of a step on one GPU
in our profile, docs/PERFORMANCE.md) comes last. Measured on one H200 (issue 12): ZeRO-2 → ZeRO-3 +85 % step time,
checkpointing on → +48 %; hence "recompute before ZeRO-3". A user's explicit stage or mode is kept; only the
`auto` ones are chosen. When nothing fits, the choice is ZeRO-3 with full checkpointing and a warning.

Estimate per rank (bytes; P all parameters incl. PEFT's trained copies, T trainable, b the weight dtype's bytes,
N the world size, each `/N` only from the stage that partitions it):
  weights b·P (/N at stage 3; a bitsandbytes LLM linear weight counts 0.52 B in nf4, 1 B in int8, and ZeRO-3
  is never chosen for a quantized base) + gradients b·T (/N from stage 2) + optimizer state 16·T with bf16/fp16
  (fp32 master, Adam m and v, fp32 gradient; 8·T in fp32; /N from stage 1; 0 with offload_optimizer=cpu)
  + communication buckets + activations of one micro-batch + 1.5 GiB (CUDA context, allocator slack).
Activations (bf16, per layer): no checkpointing 2·(10·d + 4·i) bytes per LLM token and 2·(10·d_v + 2·i_v) per
vision patch (SDPA keeps no score matrix), calibrated on the issue-12 H200 runs (≈ 10 GiB per seed-shaped
sample); checkpointing keeps 2·d bytes per layer input plus one layer's activations. Logits: 8 bytes × vocab per
LLM token (bf16 logits + their gradient + the loss's fp32 chunk); with `model.fused_ce` (auto: on for native
families) only one chunk of labelled rows exists at a time: 12 bytes × loss.CHUNK_ELEMENTS (bf16 logits, their
fp32 copy, the fp32 and bf16 gradients). The micro-batch's shape comes from the
preprocess report (longest sample, most crops per image) when the data is preprocessed, else from
`data.model_max_length` and `data.max_slice_nums + 1` crops per sample. With `train.max_tokens_per_batch` the
micro-batch is the budget's tokens and the crops the data's crops per token × budget (+25 %).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Optional

from ..config import Config, join_uri, replace

log = logging.getLogger(__name__)

GIB = 2**30
FIXED_OVERHEAD = int(1.5 * GIB)
CKPT_MODES = (False, "vision", "llm", True)
# bytes per quantized weight: NF4 4 bits + a double-quantized absmax per 64 (~0.13 bit); int8 + a row scale
QUANT_BYTES = {"nf4": 0.52, "int8": 1.0}


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts and the dims the activation estimate needs (from config.json, on the meta device)."""
    total: int
    trainable: int
    llm_hidden: int
    llm_layers: int
    llm_intermediate: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_intermediate: int
    patches_per_crop: int  # (scale_resolution / patch_size)²: a full 448×448 crop
    quantized: int = 0  # parameters in bitsandbytes layers (model.quantization nf4/int8), part of `total`


@dataclass(frozen=True)
class MicroBatch:
    """The largest micro-batch one rank runs: padded LLM tokens and crops (each padded to the longest)."""
    llm_tokens: int
    crops: int


@dataclass(frozen=True)
class Candidate:
    stage: int
    ckpt: object  # False | "vision" | "llm" | True
    bytes: int
    fits: bool


@dataclass(frozen=True)
class EnginePlan:
    stage: int
    ckpt: object
    capacity_bytes: int
    budget_bytes: int
    tried: list = field(default_factory=list)
    fits: bool = True

    def apply(self, cfg: Config) -> Config:
        return replace(cfg, deepspeed={"zero_stage": self.stage}, model={"gradient_checkpointing": self.ckpt})

    def describe(self) -> str:
        lines = [f"engine choice: ZeRO-{self.stage}, gradient_checkpointing={_name(self.ckpt)} "
                 f"(budget {self.budget_bytes / GIB:.1f} of {self.capacity_bytes / GIB:.1f} GiB per rank)"]
        for c in self.tried:
            lines.append(f"  ZeRO-{c.stage} ckpt={_name(c.ckpt):<6} estimate {c.bytes / GIB:7.1f} GiB "
                         f"{'fits' if c.fits else 'too large'}")
        if not self.fits:
            lines.append("  nothing fits the budget: lower train.micro_batch_size, or set "
                         "deepspeed.offload_optimizer=cpu (and offload_param=cpu)")
        return "\n".join(lines)


def _name(ckpt) -> str:
    return {False: "false", True: "true"}.get(ckpt, str(ckpt))


def estimate_bytes(cfg: Config, size: ModelSize, mb: MicroBatch, world: int, stage: int, ckpt) -> int:
    """Estimated peak memory of one rank (see the module docstring for the formula)."""
    ds = cfg.deepspeed
    b = 4 if cfg.model.dtype == "fp32" else 2
    n = max(1, world)
    quant_b = QUANT_BYTES.get(cfg.model.quantization, b)
    weights = (b * (size.total - size.quantized) + quant_b * size.quantized) / (n if stage == 3 else 1)
    grads = b * size.trainable / (n if stage >= 2 else 1)
    opt_per_param = 8 if b == 4 else 16
    optimizer = 0 if ds.offload_optimizer == "cpu" else opt_per_param * size.trainable / (n if stage >= 1 else 1)
    bucket = b * ds.reduce_bucket_size * (2 if ds.overlap_comm else 1) if stage >= 2 else 0
    if stage == 3:
        bucket += b * ds.reduce_bucket_size * 0.9  # prefetch of gathered parameters
    acts = activation_bytes(size, mb, ckpt, fused_ce=uses_fused_ce(cfg))
    return int(weights + grads + optimizer + bucket + acts + FIXED_OVERHEAD)


def uses_fused_ce(cfg: Config) -> bool:
    """`model.fused_ce` as models.kernels resolves it: auto is on for the natively implemented families."""
    from ..models.registry import FAMILIES

    fam = FAMILIES.get(cfg.model.family)
    return cfg.model.fused_ce is True or (cfg.model.fused_ce == "auto" and fam is not None and not fam.blocked)


def activation_bytes(size: ModelSize, mb: MicroBatch, ckpt, fused_ce: bool = False) -> int:
    """Bytes kept for backward by one micro-batch (bf16 activations; fp32 costs about twice, kept as a margin)."""
    patches = mb.crops * size.patches_per_crop
    per_patch_layer = 2 * (10 * size.vision_hidden + 2 * size.vision_intermediate)
    per_token_layer = 2 * (10 * size.llm_hidden + 4 * size.llm_intermediate)
    vision_full = patches * size.vision_layers * per_patch_layer
    llm_full = mb.llm_tokens * size.llm_layers * per_token_layer
    # checkpointed: each layer keeps its input; the layer being recomputed holds its full activations once
    vision_ckpt = patches * size.vision_layers * 2 * size.vision_hidden + patches * per_patch_layer
    llm_ckpt = mb.llm_tokens * size.llm_layers * 2 * size.llm_hidden + mb.llm_tokens * per_token_layer
    vision = vision_ckpt if ckpt in (True, "vision") else vision_full
    llm = llm_ckpt if ckpt in (True, "llm") else llm_full
    logits = 8 * size.vocab * mb.llm_tokens
    if fused_ce:
        from ..models.loss import CHUNK_ELEMENTS

        logits = min(logits, 12 * CHUNK_ELEMENTS)
    return int(vision + llm + logits)


def choose(cfg: Config, size: ModelSize, mb: MicroBatch, world: int, capacity_bytes: int) -> EnginePlan:
    """The cheapest (stage, checkpointing) the config allows whose estimate fits; see the module docstring."""
    ds = cfg.deepspeed
    stages = [ds.zero_stage] if ds.zero_stage != "auto" else [0, 1, 2, 3]
    if ds.offload_param == "cpu":
        stages = [s for s in stages if s == 3]
    if ds.offload_optimizer == "cpu":
        stages = [s for s in stages if s >= 2]
    if cfg.model.quantization != "none":
        stages = [s for s in stages if s != 3]  # ZeRO-3 cannot partition bitsandbytes weights (validation says why)
    if ds.zero_stage == "auto" and _zero3_refused(cfg):
        stages = [s for s in stages if s != 3]  # models.zero3.zero3_refusal (validation refuses an explicit 3)
    user_ckpt = cfg.model.gradient_checkpointing
    modes = [user_ckpt] if user_ckpt != "auto" else list(CKPT_MODES)
    if user_ckpt == "auto" and _tower_first(size, mb) == "llm":
        modes = [False, "llm", "vision", True]
    budget = int(ds.memory_fraction * capacity_bytes)
    # cheapest first: every non-ZeRO-3 stage with a checkpointing mode, then ZeRO-3 with each mode
    order = [(s, c) for c in modes for s in stages if s != 3] + [(3, c) for c in modes if 3 in stages]
    tried = []
    for stage, ckpt in order:
        est = estimate_bytes(cfg, size, mb, world, stage, ckpt)
        tried.append(Candidate(stage, ckpt, est, est <= budget))
        if est <= budget:
            return EnginePlan(stage, ckpt, capacity_bytes, budget, tried)
    stage, ckpt = order[-1]
    return EnginePlan(stage, ckpt, capacity_bytes, budget, tried, fits=False)


def _zero3_refused(cfg: Config) -> bool:
    from ..models.zero3 import zero3_refusal

    return zero3_refusal(cfg.model.family, cfg.trainable) is not None


def _tower_first(size: ModelSize, mb: MicroBatch) -> str:
    """The tower whose checkpointing saves more memory: text-heavy data checkpoints the LLM first."""
    return "llm" if activation_bytes(size, mb, "llm") < activation_bytes(size, mb, "vision") else "vision"


def model_size(cfg: Config) -> ModelSize:
    """Counts from the checkpoint's config.json: the model is built on the meta device (no weights, ~1 s) and the
    trainable policy applied, so LoRA and PEFT's trained copies are counted exactly as they will exist."""
    import torch

    from ..models import apply_trainable_policy, get_family, trainable_parameter_counts
    from ..models.registry import read_config_json

    fam = get_family(cfg.model.family)
    if fam.hf_native:
        return _hf_native_size(cfg, fam)
    conf = fam.config_class.from_checkpoint_dict(read_config_json(cfg.model.path))
    with torch.device("meta"):
        model = apply_trainable_policy(fam.model_class(conf), cfg.trainable, cfg.lora)
    quantized = 0
    if cfg.model.quantization != "none":  # the LLM linear layers bitsandbytes replaces (not lm_head)
        quantized = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                        and "llm." in n and "lora_" not in n and not n.endswith("lm_head"))
    v = conf.vision_config_hf()
    side = int(conf.slice_config.get("scale_resolution", 448)) // conf.patch_size
    return ModelSize(total=trainable_parameter_counts(model, trainable_only=False)["total"],
                     trainable=trainable_parameter_counts(model)["total"],
                     llm_hidden=conf.hidden_size, llm_layers=conf.num_hidden_layers,
                     llm_intermediate=conf.intermediate_size, vocab=conf.vocab_size,
                     vision_hidden=v.hidden_size, vision_layers=v.num_hidden_layers,
                     vision_intermediate=v.intermediate_size, patches_per_crop=int(side * side),
                     quantized=quantized)


def _hf_native_size(cfg: Config, fam) -> ModelSize:
    """4.6 / 4.7: the same counts from transformers' config (LLM and vision sizes in nested sub-configs)."""
    import torch

    from ..models import apply_trainable_policy, trainable_parameter_counts

    conf = fam.config_class.from_pretrained(cfg.model.path)
    with torch.device("meta"):
        model = apply_trainable_policy(fam.model_class(conf), cfg.trainable, cfg.lora)
    t, v = conf.text_config, conf.vision_config
    side = int(conf.image_size) // int(v.patch_size)
    return ModelSize(total=trainable_parameter_counts(model, trainable_only=False)["total"],
                     trainable=trainable_parameter_counts(model)["total"],
                     llm_hidden=t.hidden_size, llm_layers=t.num_hidden_layers, llm_intermediate=t.intermediate_size,
                     vocab=t.vocab_size, vision_hidden=v.hidden_size, vision_layers=v.num_hidden_layers,
                     vision_intermediate=v.intermediate_size, patches_per_crop=int(side * side))


def micro_batch_shape(cfg: Config, size: ModelSize) -> MicroBatch:
    """The largest micro-batch: from the preprocess report when there is one, else from the data limits."""
    per_sample_tokens, per_sample_crops = cfg.data.model_max_length, cfg.data.max_slice_nums + 1
    report = _read_report(cfg)
    if report:
        train = report["splits"]["train"]
        per_sample_tokens = int(train["tokens"]["max"]) or per_sample_tokens
        crops = [int(k) for k in train.get("crops_per_image", {})]
        images_per_sample = train["images"] / max(1, train["records_out"])
        if crops:
            per_sample_crops = max(crops) * max(1, round(images_per_sample + 0.49))
    budget = cfg.train.max_tokens_per_batch
    if budget is not None:  # a token budget (packed or padded): the budget's tokens, crops at the data's rate
        return MicroBatch(llm_tokens=budget, crops=_budget_crops(budget, report, per_sample_tokens,
                                                                  per_sample_crops))
    mbs = cfg.train.micro_batch_size
    return MicroBatch(llm_tokens=mbs * per_sample_tokens, crops=mbs * per_sample_crops)


def _budget_crops(budget: int, report: Optional[dict], per_sample_tokens: int, per_sample_crops: int) -> int:
    """Crops in a micro-batch of `budget` tokens: the data's crops per token × budget with a 25 % margin (the
    preprocess report), at least one largest sample's crops; without a report, budget / longest sample × its crops.
    """
    if report:
        train = report["splits"]["train"]
        crops = sum(int(k) * int(v) for k, v in train.get("crops_per_image", {}).items())
        tokens = int(train["tokens"].get("total", 0))
        if tokens > 0:
            return max(per_sample_crops, math.ceil(1.25 * budget * crops / tokens))
    return max(1, math.ceil(budget / max(1, per_sample_tokens))) * per_sample_crops


def _read_report(cfg: Config) -> Optional[dict]:
    if not cfg.data.preprocessed:
        return None
    path = join_uri(cfg.data_output_path, "report.json")
    try:
        if "://" in path:
            import pyarrow.fs as pafs

            fs, p = pafs.FileSystem.from_uri(path)
            with fs.open_input_stream(p) as f:
                return json.loads(f.read())
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError, KeyError) as e:
        log.warning("engine choice: cannot read %s (%s); estimating from data.model_max_length", path, e)
        return None


def local_capacity_bytes(use_gpu: bool, local_workers: int = 1) -> int:
    """The card's total memory (smallest over local cards), or on CPU the host's memory split over the workers."""
    import torch

    if use_gpu and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    import psutil

    return int(psutil.virtual_memory().total // max(1, local_workers))


def plan_engine(cfg: Config, world_size: int, capacity_bytes: int) -> EnginePlan:
    """Resolve the `auto` choices of `cfg` for `world_size` ranks of `capacity_bytes` each."""
    if cfg.deepspeed.zero_stage != "auto" and cfg.model.gradient_checkpointing != "auto":
        return EnginePlan(cfg.deepspeed.zero_stage, cfg.model.gradient_checkpointing, capacity_bytes,
                          int(cfg.deepspeed.memory_fraction * capacity_bytes))
    size = model_size(cfg)
    return choose(cfg, size, micro_batch_shape(cfg, size), world_size, capacity_bytes)


__all__ = ["EnginePlan", "ModelSize", "MicroBatch", "plan_engine", "choose", "estimate_bytes", "model_size",
           "micro_batch_shape", "local_capacity_bytes"]
