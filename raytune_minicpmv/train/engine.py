"""DeepSpeed wiring: the engine config, the optimizer and the learning-rate schedule, all from our typed config.

    from raytune_minicpmv.train.engine import build_ds_config, build_optimizer, build_lr_scheduler
    ds_cfg = build_ds_config(cfg)                     # dict for deepspeed.initialize / zero.Init (stage 0-3)
    opt = build_optimizer(model, cfg)                 # torch AdamW (fused on CUDA) or DeepSpeedCPUAdam with offload
    sched = build_lr_scheduler(opt, cfg.optim, cfg.train.max_steps)  # torch LambdaLR: the schedule named

What the DeepSpeed config deliberately does NOT contain:

* no ``optimizer`` block: we pass the optimizer, so weight decay grouping (no decay on biases and norm weights)
  and the betas/eps of the config are what runs;
* no ``scheduler`` block: the official MiniCPM-V recipe shipped a DeepSpeed ``WarmupLR`` block that silently
  replaced the cosine schedule it asked for. Here the schedule is a torch ``LambdaLR`` handed to
  ``deepspeed.initialize(lr_scheduler=...)``; DeepSpeed steps it once per optimizer step and saves it in its
  checkpoints, so resume restores it exactly.

Optimizer choice: plain ``torch.optim.AdamW`` needs no compiled op (``fused=True`` on CUDA). With
``deepspeed.offload_optimizer=cpu`` the optimizer step runs on the CPU on fp32 master weights; DeepSpeed then wants
its C++ ``DeepSpeedCPUAdam``, which is JIT-compiled on first use (about 2 minutes on 2 cores, cached in
``~/.cache/torch_extensions`` or ``$TORCH_EXTENSIONS_DIR``; needs g++ and ninja). On Hopper machines that export
``TORCH_CUDA_ARCH_LIST=9.0a`` DeepSpeed's op builder cannot parse the ``a`` suffix: `fix_cuda_arch_list` rewrites
it to ``9.0`` before any JIT build.
"""
from __future__ import annotations

import math
import os

import torch

from ..config import Config, OptimConfig

# Parameters whose name matches one of these (or that are 1-D) get no weight decay: biases, norm weights, and the
# learned query / position tables, where decay only pulls them towards zero without regularizing anything.
NO_DECAY_MARKERS = ("bias", "norm", "ln_", "layernorm", "position_embedding", "query", "pos_embed")



def build_ds_config(cfg: Config) -> dict:
    """The DeepSpeed config dict: ZeRO stage, offload, precision, clipping, batch sizes. No optimizer/scheduler.

    `zero_stage: auto` must be resolved first (`engine_plan.plan_engine(...).apply(cfg)`, done by build_engine).
    Stage 0 is plain data parallelism (gradients all-reduced; bf16 keeps fp32 master weights in DeepSpeed's
    mixed-precision optimizer), 1 partitions the optimizer state, 2 the gradients too, 3 the parameters too.
    """
    ds, tr = cfg.deepspeed, cfg.train
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage={ds.zero_stage!r}: resolve 'auto' with engine_plan.plan_engine "
                         "before building the DeepSpeed config")
    zero: dict = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": int(ds.reduce_bucket_size),
    }
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if ds.zero_stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": int(ds.reduce_bucket_size * 0.9),
            "stage3_param_persistence_threshold": int(ds.param_persistence_threshold),
            # we gather the trainable tensors ourselves (checkpoint.py); this only enables engine.save_16bit_model
            "stage3_gather_16bit_weights_on_model_save": True,
            "memory_efficient_linear": memory_efficient_linear(cfg),
        })
        if ds.offload_param == "cpu":
            zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    config = {
        # DeepSpeed checks train_batch_size == micro * accumulation * world size; we give the parts and let it
        # derive the product from the real world size.
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.gradient_accumulation_steps,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.dtype == "bf16"},
        "fp16": {"enabled": cfg.model.dtype == "fp16", "loss_scale": 0,  # 0: dynamic loss scaling
                 "initial_scale_power": ds.fp16_initial_scale_power, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 10**9,  # our own metrics replace DeepSpeed's periodic prints
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer == "cpu" and not ds.cpu_adam:
        config["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on CPU master weights: slow, but no JIT build
    return config


def memory_efficient_linear(cfg: Config) -> bool:
    """ZeRO-3's `memory_efficient_linear`, `auto` resolved (after engine_plan resolved the checkpointing mode).

    DeepSpeed's linear saves the weight Parameter for the backward, where torch's F.linear saves a view of the
    gathered weight, which keeps the gathered copy alive until the backward when the layer's activations are
    kept. With every layer recomputed (checkpointing true) nothing of the forward is kept, so torch's own linear
    holds no more memory, and DeepSpeed's costs a Python autograd function (and an inspect.signature) per call."""
    mel = cfg.deepspeed.memory_efficient_linear
    return cfg.model.gradient_checkpointing is not True if mel == "auto" else bool(mel)


def restore_torch_linear() -> bool:
    """Undo a process-wide F.linear patch of an earlier ZeRO-3 zero.Init with memory_efficient_linear on
    (DeepSpeed restores it only on its compile path); True when something was restored."""
    import torch.nn.functional as F
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Patcher

    original = getattr(Patcher, "linear_bk", None)
    if original is None or F.linear is original:
        return False
    F.linear = original
    return True


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters: with and without weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitioned params have an empty local shape
        lname = name.lower()
        if len(shape) < 2 or any(m in lname for m in NO_DECAY_MARKERS):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters with the config's betas, eps, lr and decay grouping."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if not groups:
        raise ValueError("no trainable parameters: check the trainable.* section of the config")
    kwargs = dict(lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
    if cfg.deepspeed.offload_optimizer == "cpu" and cfg.deepspeed.cpu_adam:
        fix_cuda_arch_list()
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # JIT-builds cpu_adam on first use (minutes)

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    on_cuda = cfg.scaling.use_gpu and torch.cuda.is_available() and cfg.deepspeed.offload_optimizer == "none"
    return torch.optim.AdamW(groups, fused=on_cuda, **kwargs)


def warmup_steps(o: OptimConfig, max_steps: int) -> int:
    if o.warmup_steps is not None:
        return o.warmup_steps
    return int(math.ceil(o.warmup_ratio * max_steps))


def lr_lambda(step: int, *, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak lr after `step` optimizer steps: linear warmup, then cosine/linear decay to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup  # the first step already trains at lr/warmup, never at 0
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * (1.0 - progress)  # linear


def build_lr_scheduler(optimizer: torch.optim.Optimizer, o: OptimConfig,
                       max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule `optim.scheduler` names over `max_steps`, as a torch LambdaLR stepped once per optimizer step."""
    import functools

    fn = functools.partial(lr_lambda, total=max_steps, warmup=warmup_steps(o, max_steps), kind=o.scheduler,
                           min_ratio=o.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def fix_cuda_arch_list() -> None:
    """DeepSpeed's JIT op builder parses TORCH_CUDA_ARCH_LIST as numbers; '9.0a' (set on Hopper images) breaks it."""
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch and "a" in arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(a.rstrip("a") for a in arch.replace(" ", ";").split(";") if a)
