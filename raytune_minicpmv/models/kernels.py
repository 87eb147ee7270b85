"""The run's kernel levers on a loaded native model: packed vision, fused linear + CE, Liger, compiled vision layers.

    plan = configure_kernels(model, cfg.model, use_gpu=cfg.scaling.use_gpu)   # before PEFT wrapping
    print(plan.describe())      # "kernels: vision_varlen=on, fused_ce=torch, liger=off, compile_vision=off"
    model = apply_trainable_policy(model, ...)
    if plan.compile_vision: compile_vision_layers(model)                      # after it (PEFT copies vpm)
    fused = uses_fused_loss(model)                                            # the train loop's loss path

Each lever is a `model.*` config switch (auto | true | false), resolved here:

* `vision_varlen`: crops packed without padding (vision.py "Packed"). auto = on, except for the 2.5 tower (its
  crops attend their padding, as the remote code's do, so the padded path is its semantics; true is refused).
* `fused_ce`: the training loss from hidden states (loss.linear_cross_entropy): no `[tokens, vocab]` logits, and
  only labelled rows go through lm_head. auto = on for native models (exact: same sum and count).
* `liger`: Liger Kernel (optional extra `gpu`, Triton, CUDA only) for the LLM: RMSNorm, SwiGLU MLP and RoPE
  patched into the Qwen2 / Llama decoder, and its fused linear + CE kernel as the `fused_ce` implementation when
  lm_head is a plain Linear (not LoRA-wrapped, not ZeRO-3-partitioned). auto = on when CUDA is in use and
  `liger_kernel` imports; true without it is an error naming the fix.
* `compile_vision`: `torch.compile` of each vision encoder layer's MLP and layer norms (the per-token parts; the
  packed attention loops over crop runs and stays eager). Off unless asked: the first steps pay compilation.
* `vision_attention` (with vision_varlen): `grouped` = one SDPA call per run of equal-length crops (exact on CPU),
  `varlen` = one torch `varlen_attn` call per layer for all crops (CUDA, bf16/fp16, no attention dropout). auto =
  grouped (with flash SDPA it measured faster than varlen on the H200).
* `sdpa_kernel`: torch SDPA's kernel family on CUDA. `cudnn` is torch's first choice on Hopper, and it builds a
  cuDNN graph for every new shape — real batches change shape every step (sample lengths, crops per run), so the
  host spends milliseconds per attention call building graphs (the issue-12 profile). `flash` disables the cuDNN
  backend for this process (FlashAttention-2 / memory-efficient kernels, no per-shape build). auto = flash on CUDA.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelPlan:
    vision_varlen: bool
    fused_ce: bool
    liger: bool
    compile_vision: bool
    vision_attention: str = "grouped"  # with vision_varlen: grouped | varlen
    sdpa_kernel: str = "default"  # default (CPU: torch's choice) | cudnn | flash

    def describe(self) -> str:
        on = lambda b: "on" if b else "off"  # noqa: E731
        fused = ("liger" if self.liger else "torch") if self.fused_ce else "off (logits)"
        vision = f" ({self.vision_attention} attention)" if self.vision_varlen else ""
        return (f"kernels: vision_varlen={on(self.vision_varlen)}{vision}, fused_ce={fused}, liger={on(self.liger)}, "
                f"compile_vision={on(self.compile_vision)}, sdpa={self.sdpa_kernel}")


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None


def plan_kernels(model: nn.Module, model_cfg, use_gpu: bool) -> KernelPlan:
    """Resolve the `auto` switches for this model and machine; an impossible `true` raises ValueError."""
    from .modeling import MiniCPMVBase

    native = isinstance(model, MiniCPMVBase)
    legacy = native and model.legacy_strip_positions
    varlen = _switch(getattr(model_cfg, "vision_varlen", "auto"), native and not legacy)
    if varlen and not (native and not legacy):
        raise ValueError("model.vision_varlen=true: needs a native MiniCPM-V 2.6 model (the 2.5 tower attends its "
                         "crops' padding, so packing would change its outputs); use auto or false")
    fused = _switch(getattr(model_cfg, "fused_ce", "auto"), native)
    if fused and not native:
        raise ValueError("model.fused_ce=true: needs a native model (remote-code models only return logits)")
    cuda = use_gpu and torch.cuda.is_available()
    liger = _switch(getattr(model_cfg, "liger", "auto"), native and cuda and liger_available())
    if liger and not (cuda and liger_available() and native):
        raise ValueError("model.liger=true: needs CUDA GPUs and the `liger-kernel` package (pip install "
                         "'raytune-minicpmv[gpu]', or the liger_kernel wheel) on every worker, and a native model; "
                         "use auto or false")
    half = _model_dtype(model) in (torch.float16, torch.bfloat16)
    can_varlen = varlen and cuda and half and _varlen_attn_available() and not _vision_dropout(model)
    attention = getattr(model_cfg, "vision_attention", "auto")
    if attention == "varlen" and not can_varlen:
        raise ValueError("model.vision_attention=varlen: needs packed vision (model.vision_varlen), CUDA GPUs, a bf16 "
                         "or fp16 model, torch.nn.attention.varlen (torch >= 2.10) and attention_dropout 0 in the "
                         "vision config; use auto or grouped")
    # auto = grouped: with flash SDPA it measured faster than one varlen call per layer (H200, issue-12 workload:
    # 0.884 vs 0.947 s/step, docs/PERFORMANCE.md "Attention kernels")
    attention = "grouped" if attention == "auto" else attention
    sdpa = getattr(model_cfg, "sdpa_kernel", "auto")
    sdpa = "default" if not cuda else ("flash" if sdpa == "auto" else sdpa)
    return KernelPlan(varlen, fused, liger, bool(getattr(model_cfg, "compile_vision", False)) and native,
                      attention if varlen else "grouped", sdpa)


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (its compute dtype), float32 if none."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _varlen_attn_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def _vision_dropout(model: nn.Module) -> float:
    """The vision tower's attention dropout (the Idefics2 attention module keeps it as `dropout`)."""
    layers = getattr(getattr(getattr(model, "vpm", None), "encoder", None), "layers", None) or []
    return float(getattr(layers[0].self_attn, "dropout", 0.0)) if len(layers) else 0.0


def configure_kernels(model: nn.Module, model_cfg, use_gpu: bool) -> KernelPlan:
    """Apply the resolved plan to a freshly loaded model (call before PEFT wrapping and DeepSpeed)."""
    plan = plan_kernels(model, model_cfg, use_gpu)
    model.vision_chunk = getattr(model_cfg, "vision_chunk_crops", None)
    if plan.vision_varlen:
        model.vision_varlen = True
        model.vpm.crop_attention = plan.vision_attention  # read by the packed tower (vision.py)
    if plan.sdpa_kernel == "flash":  # no cuDNN SDPA in this process: see the module docstring
        torch.backends.cuda.enable_cudnn_sdp(False)
    elif plan.sdpa_kernel == "cudnn":
        torch.backends.cuda.enable_cudnn_sdp(True)
    if plan.fused_ce:
        model.fused_ce = True
        model.fused_ce_impl = "liger" if plan.liger else "torch"
    if plan.liger:
        apply_liger(model.llm)
    return plan


def uses_fused_loss(model: nn.Module) -> bool:
    """Whether the training loss comes from `model(batch, loss_only=True)` (PEFT-wrapped models included)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "fused_ce", False))


def _switch(value, auto: bool) -> bool:
    return auto if value == "auto" else bool(value)


def apply_liger(llm: nn.Module) -> None:
    """Liger's RMSNorm, SwiGLU and RoPE in the LLM instance (its CE is used through `liger_linear_cross_entropy`)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_qwen2

    patch = {"qwen2": apply_liger_kernel_to_qwen2, "llama": apply_liger_kernel_to_llama}.get(llm.config.model_type)
    if patch is None:
        raise ValueError(f"model.liger: no Liger patch for LLM type {llm.config.model_type!r} (qwen2, llama)")
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=llm)


def liger_linear_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Linear,
                               label_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Liger's fused linear + CE (Triton), sum over labels != -100, on the labelled rows only."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    from .loss import labelled_rows

    rows_h, rows_l, n_tokens = labelled_rows(hidden, labels, label_positions)
    if rows_l.numel() == 0:
        return head(rows_h).float().sum(), n_tokens
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, rows_h, rows_l, head.bias)
    return loss.float(), n_tokens


def compile_vision_layers(model: nn.Module) -> int:
    """`torch.compile` the per-token submodules of every vision encoder layer (dynamic shapes: crops vary).

    Call it on the final (PEFT-wrapped) model: a compiled module keeps a reference to its own `forward`, so
    compiling before PEFT copies `vpm` (modules_to_save) would run the frozen original inside the trained copy."""
    from transformers.models.idefics2.modeling_idefics2 import Idefics2EncoderLayer

    n = 0
    for layer in model.modules():
        if isinstance(layer, Idefics2EncoderLayer):
            for name in ("mlp", "layer_norm1", "layer_norm2"):
                getattr(layer, name).compile(dynamic=True)
            n += 1
    return n
