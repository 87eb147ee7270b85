r"""Which parameters train: an explicit per-part policy (full / lora / frozen), or the official script's preset.

    model = apply_trainable_policy(model, cfg.trainable, cfg.lora)   # may return a peft.PeftModel
    print(format_parameter_table(model))                             # per-part trainable / total counts

Parts: `vision` (vpm.*), `resampler` (resampler.*), `embed_tokens` (llm.model.embed_tokens), `llm` (every other
llm.* weight, incl. lm_head). Without any `lora` part the policy only sets `requires_grad`. With one, the model is
wrapped by PEFT (no task_type, like the official script): LoRA on `lora.target_modules` (LLM) and/or
`lora.vision_target_modules` (vision), regexes matched with `re.fullmatch` on module names; parts set to `full`
become PEFT `modules_to_save` (trained copies saved in the adapter), which is the official layout.

MiniCPM-V 4.6 / 4.7 (transformers' layout) map onto the same parts: `vision` = `model.vision_tower.*` except its
window-attention merger, `resampler` = the connector (`model.vision_tower.vit_merger` + `model.merger`: there is no
resampler, these two downsample the patches 4x + 4x), `embed_tokens` = `model.language_model.embed_tokens` — which
IS the output head when the checkpoint ties `lm_head` to it (the real 4.6 does), so `embed_tokens: frozen` freezes
the head too — and `llm` = every other `model.language_model.*` / `lm_head` weight. When `lora.target_modules` /
`lora.vision_target_modules` are left at their 2.x defaults (`llm\..*` / `vpm\..*`), a 4.x model uses its family's
default targets instead (`registry.V4_LORA_TARGETS`: both kinds of token mixer of the hybrid LLM).

Preset `seed_compat` reproduces `finetune.py --use_lora true`: LoRA on `lora.target_modules`, plus trained copies
of `embed_tokens` and `resampler`, plus `vpm` when `trainable.vision == "full"` (the script's `--tune_vision`).
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

PARTS = ("vision", "resampler", "embed_tokens", "llm", "lora")
_PREFIX = re.compile(r"^(base_model\.model\.)")
_WRAPPED = re.compile(r"\.(modules_to_save\.[^.]+|original_module)\.")  # PEFT's copies inside a module


def apply_trainable_policy(model: nn.Module, trainable_cfg, lora_cfg) -> nn.Module:
    """Freeze / LoRA-wrap `model` per `trainable_cfg` (config.TrainableConfig) and `lora_cfg` (config.LoraConfig)."""
    parts = _resolve_parts(trainable_cfg)
    family = _family(model)
    lora_targets = _lora_targets(parts, lora_cfg, family)
    if not lora_targets:
        for name, p in model.named_parameters():
            p.requires_grad_(parts[part_of(name)] == "full")
        if parts["embed_tokens"] == "frozen" and parts["llm"] != "frozen":
            _inputs_require_grads(model)
        return model
    if parts["llm"] == "full":
        raise ValueError("trainable.llm=full with LoRA elsewhere would copy the whole LLM into the adapter; "
                         "use trainable.llm=lora (or make every part full/frozen without LoRA)")
    from peft import LoraConfig, get_peft_model

    modules_to_save = _modules_to_save(parts, family)
    peft_cfg = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                          target_modules="|".join(f"(?:{t})" for t in lora_targets), bias="none",
                          modules_to_save=modules_to_save or None,
                          # a tied lm_head (4.6) must follow the trained embedding copy, or training and the merged
                          # checkpoint (one tensor for both) would disagree
                          **({"ensure_weight_tying": True} if _tied(model) and parts["embed_tokens"] == "full" else {}))
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = get_peft_model(model, peft_cfg)
    if parts["embed_tokens"] == "frozen":
        # Gradient checkpointing (reentrant) drops grads of blocks whose inputs don't require grad.
        _inputs_require_grads(peft_model.get_base_model())
    return peft_model


def _resolve_parts(t) -> dict[str, str]:
    if t.preset == "seed_compat":
        return {"vision": "full" if t.vision == "full" else "frozen", "resampler": "full", "embed_tokens": "full",
                "llm": "lora"}
    if t.preset is not None:
        raise ValueError(f"trainable.preset={t.preset!r}: only 'seed_compat' exists")
    return {"vision": t.vision, "resampler": t.resampler, "embed_tokens": t.embed_tokens, "llm": t.llm}


def _family(model: nn.Module):
    from .registry import FAMILIES, family_of_model

    return FAMILIES.get(family_of_model(model) or "", FAMILIES["minicpmv2_6"])


def _lora_targets(parts: dict[str, str], lora_cfg, family) -> list[str]:
    from .registry import FAMILIES

    v2 = FAMILIES["minicpmv2_6"]  # the config's defaults are the 2.x layout; a 4.x model gets its own instead
    llm = family.lora_targets if lora_cfg.target_modules == v2.lora_targets else lora_cfg.target_modules
    vision = family.vision_lora_targets if lora_cfg.vision_target_modules == v2.vision_lora_targets \
        else lora_cfg.vision_target_modules
    return [rx for part, rx in (("llm", llm), ("vision", vision)) if parts[part] == "lora"]


def _tied(model: nn.Module) -> bool:
    out, inp = getattr(model, "get_output_embeddings", lambda: None)(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def _modules_to_save(parts: dict[str, str], family) -> list[str]:
    """PEFT names (suffix match on module names) of the `full` parts next to LoRA."""
    if not family.hf_native:
        return [m for part, m in (("embed_tokens", "embed_tokens"), ("resampler", "resampler"), ("vision", "vpm"))
                if parts[part] == "full"]
    names = []
    if parts["embed_tokens"] == "full":
        names.append("model.language_model.embed_tokens")
    if parts["resampler"] == "full":
        names.append("model.merger")
        if parts["vision"] != "full":  # else the vit_merger is inside the trained copy of the whole tower
            names.append("model.vision_tower.vit_merger")
    if parts["vision"] == "full":
        names.append("model.vision_tower")
    return names


def _inputs_require_grads(model: nn.Module) -> None:
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def part_of(name: str) -> str:
    """The policy part of a parameter name (plain, or PEFT-wrapped)."""
    name = _WRAPPED.sub(".", _PREFIX.sub("", name))
    if "lora_" in name:
        return "lora"
    if name.startswith("vpm."):
        return "vision"
    if name.startswith("resampler."):
        return "resampler"
    if name.startswith(("model.merger.", "model.vision_tower.vit_merger.")):  # 4.x connector
        return "resampler"
    if name.startswith("model.vision_tower."):
        return "vision"
    if ".embed_tokens." in name or name.startswith("embed_tokens."):
        return "embed_tokens"
    return "llm"


def _numel(p: torch.Tensor) -> int:
    quant = getattr(p, "quant_state", None)  # bitsandbytes 4-bit: 2 weights per stored byte; count the weights
    if quant is not None and getattr(quant, "shape", None) is not None:
        return int(torch.Size(quant.shape).numel())
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitions params; ds_numel is the full size


def trainable_parameter_counts(model: nn.Module, trainable_only: bool = True) -> dict[str, int]:
    """`{part: count}` for PARTS plus `total`; ZeRO-3 aware. PEFT's frozen originals are counted as frozen."""
    counts = {p: 0 for p in PARTS}
    for name, p in model.named_parameters():
        if p.requires_grad or not trainable_only:
            counts[part_of(name)] += _numel(p)
    counts["total"] = sum(counts.values())
    return counts


def format_parameter_table(model: nn.Module) -> str:
    """A printable per-part table of trainable and total parameters."""
    trained, total = trainable_parameter_counts(model), trainable_parameter_counts(model, trainable_only=False)
    lines = [f"{'part':<14}{'trainable':>16}{'total':>16}{'%':>8}"]
    for part in (*PARTS, "total"):
        pct = 100.0 * trained[part] / total[part] if total[part] else 0.0
        lines.append(f"{part:<14}{trained[part]:>16,}{total[part]:>16,}{pct:>7.2f}%")
    return "\n".join(lines)


def enable_gradient_checkpointing(model: nn.Module, base: Optional[nn.Module] = None, mode=True) -> None:
    """Non-reentrant activation checkpointing of the vision encoder layers and/or the LLM decoder layers.

    `mode`: True (both towers), "vision" (only `vpm` layers: the activation hog of image-heavy data), "llm" (only
    the decoder layers), False (nothing). Layers of the other tower keep their activations (no recompute).
    """
    if mode is False:
        return
    base = base or (model.get_base_model() if hasattr(model, "get_base_model") else model)
    fn = getattr(base, "activation_checkpointing_enable", None)
    kwargs = {"use_reentrant": False}
    if fn is not None:
        fn(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if mode is True:
        return
    if mode not in ("vision", "llm"):
        raise ValueError(f"gradient checkpointing mode {mode!r}: expected true, false, 'vision' or 'llm'")
    towers = ("model.language_model", "model.vision_tower") if _family(base).hf_native else ("llm", "vpm")
    off = towers[0] if mode == "vision" else towers[1]  # the tower that keeps its activations
    for name, module in base.named_modules():
        if (name == off or name.startswith(off + ".")) and getattr(module, "gradient_checkpointing", False):
            module.gradient_checkpointing = False
