"""bitsandbytes quantization of the base model (QLoRA): NF4 or int8 LLM linear layers, at load or as published.

    kwargs = from_pretrained_kwargs(raw_config, "nf4", torch.bfloat16, "cpu")  # -> quantization_config, device_map
    model = load_model(ckpt, dtype=torch.bfloat16, quantization="nf4")    # registry.load_model calls this module
    quantized_module_names(model)            # ['llm.model.layers.0.self_attn.q_proj', ...]
    dequantize_checkpoint(int4_dir, bf16_dir)  # a published 4-bit checkpoint as a plain bf16 one (for the merge)

Two ways in, one setting (`model.quantization: none | nf4 | int8`):
* a bf16 base, quantized while it loads: transformers' `BitsAndBytesConfig` (NF4 with double quantization, compute
  in the model dtype; or LLM.int8) replaces the LLM's `nn.Linear` layers by bitsandbytes ones. `KEEP_UNQUANTIZED`
  keeps the vision tower, the resampler and `lm_head` in the model dtype (embeddings are not linear layers, so they
  stay too): they are the smaller part of the weights (2.6: ~1.5 B of 8.1 B with the embeddings), the image path is the most
  precision-sensitive part (a 4-bit SigLIP shifts every image token the LLM sees), and they are often trained in
  full (`trainable.vision/resampler: full`), which a quantized weight cannot be;
* a published pre-quantized checkpoint (e.g. openbmb/MiniCPM-V-2_6-int4): its config.json carries
  `quantization_config` (quant_method bitsandbytes) and its safetensors the packed weights plus their quant state;
  transformers reads both as they are, including that checkpoint's own skip list (the 2.6 int4 one keeps only
  `out_proj`, `kv_proj` and `lm_head`, so its vision tower's other linears ARE 4-bit). `model.quantization` must
  name the checkpoint's method (validation says so), so the rules below apply to it too.

Nothing here is MiniCPM-V 2.6 specific except `KEEP_UNQUANTIZED`'s module names: a transformers-native family
(4.6/4.7) gets the same from `from_pretrained_kwargs(...)` with its own names (`vision_tower`, `merger`, `lm_head`).
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Optional

import torch

QUANTIZATIONS = ("none", "nf4", "int8")
# Module-name patterns transformers never converts (prefix up to a module boundary, or suffix): see module docstring.
KEEP_UNQUANTIZED = ("vpm", "resampler", "lm_head")
# The same, per family, for the transformers-native 4.6 / 4.7 classes (MiniCPMV4_6ForConditionalGeneration:
# model.vision_tower, model.language_model, model.merger, lm_head tied to the embeddings) once the registry loads them
# (issue 11): pass `keep=keep_unquantized(family)` to `from_pretrained_kwargs`.
KEEP_BY_FAMILY = {"minicpmv2_6": KEEP_UNQUANTIZED, "minicpmv2_5": KEEP_UNQUANTIZED,
                  "minicpmv4_6": ("model.vision_tower", "model.merger", "lm_head"),
                  "minicpmv4_7": ("model.vision_tower", "model.merger", "lm_head")}
INSTALL_HINT = "pip install 'raytune-minicpmv[qlora]' (bitsandbytes >= 0.48)"


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def checkpoint_quantization(raw: dict) -> Optional[str]:
    """What a config.json dict says its weights are: None (plain), "nf4" / "fp4" / "int8" (bitsandbytes), or
    "<quant_method>" for another quantizer (gptq, awq, ...)."""
    q = raw.get("quantization_config")
    if not isinstance(q, dict):
        return None
    method = str(q.get("quant_method", "bitsandbytes"))
    if method != "bitsandbytes":
        return method
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        return "int8"
    return str(q.get("bnb_4bit_quant_type", "fp4"))


def keep_unquantized(family: str) -> tuple[str, ...]:
    """The module-name patterns a family keeps in its model dtype when quantized at load."""
    if family not in KEEP_BY_FAMILY:
        raise ValueError(f"model.quantization: no quantization layout for family {family!r} "
                         f"(known: {', '.join(KEEP_BY_FAMILY)})")
    return KEEP_BY_FAMILY[family]


def bnb_config(kind: str, compute_dtype: torch.dtype, keep: tuple[str, ...] = KEEP_UNQUANTIZED):
    """The transformers `BitsAndBytesConfig` that quantizes a plain checkpoint at load (`kind` nf4 or int8)."""
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        # double quantization: the per-block absmax scales are quantized too (~0.4 bit/param less, QLoRA paper)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=list(keep))
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(keep))
    raise ValueError(f"model.quantization={kind!r}: expected one of {', '.join(QUANTIZATIONS)}")


def from_pretrained_kwargs(raw: dict, kind: str, compute_dtype: torch.dtype, device,
                           keep: tuple[str, ...] = KEEP_UNQUANTIZED) -> dict:
    """Extra `from_pretrained` kwargs for `kind` on the checkpoint whose config.json is `raw` ({} for none).

    A pre-quantized checkpoint brings its own quantization_config (transformers reads it from the config), so only
    the device is added; a plain one gets `bnb_config(kind)`. The device is explicit: bitsandbytes quantizes on it
    (the GPU of this rank; "cpu" on the CPU backend), and transformers would otherwise pick cuda:current.
    """
    found = checkpoint_quantization(raw)
    if kind == "none" and found is None:
        return {}
    if kind == "none" or (found is not None and found != kind):
        raise ValueError(f"model.quantization={kind}, but the checkpoint is quantized as {found} "
                         f"(config.json quantization_config); set model.quantization={found}")
    if not bitsandbytes_available():
        raise ImportError(f"model.quantization={kind} needs bitsandbytes: {INSTALL_HINT}")
    kwargs = {"device_map": {"": str(device)}}
    if found is None:
        kwargs["quantization_config"] = bnb_config(kind, compute_dtype, keep)
    return kwargs


def cast_unquantized(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Every floating-point parameter outside the packed bitsandbytes weights in `dtype`. Needed after loading a
    pre-quantized checkpoint in a dtype other than its stored one: transformers then leaves the unquantized layers'
    `.weight`s in the stored dtype but casts biases and norms (a conv with bf16 weight and fp32 bias fails)."""
    for p in model.parameters():
        if p.dtype.is_floating_point and p.dtype != dtype and type(p).__name__ != "Params4bit":
            p.data = p.data.to(dtype)
    return model


def quantized_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the bitsandbytes linear layers of `model` (PEFT-wrapped or not)."""
    if not bitsandbytes_available():
        return []
    import bitsandbytes as bnb

    return [n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def is_quantized(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def dequantize_checkpoint(src, dst, dtype: torch.dtype = torch.bfloat16, max_shard_size: str = "2GB") -> Path:
    """Write a plain `dtype` copy of the pre-quantized checkpoint `src` to `dst`: every bitsandbytes layer's weight
    dequantized (the exact values the 4-bit / int8 kernels compute with), config.json = the original minus
    `quantization_config`, every other file copied. Holds the whole model in host memory once."""
    from .registry import load_model, read_config_json

    src, dst = Path(src), Path(dst)
    raw = read_config_json(src)
    kind = checkpoint_quantization(raw)
    if kind not in ("nf4", "fp4", "int8"):
        raise ValueError(f"{src}: not a bitsandbytes-quantized checkpoint (config.json quantization_config: "
                         f"{raw.get('quantization_config')!r})")
    model = load_model(src, dtype=dtype, quantization=kind)
    model = model.dequantize(dtype=dtype)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dst), max_shard_size=max_shard_size)
    weights = {p.name for p in dst.iterdir()}
    for f in src.iterdir():  # tokenizer, processor, remote code, ...: as in the source
        if f.is_file() and f.name not in weights and f.name != "config.json" and not _is_weight_file(f.name):
            shutil.copyfile(f, dst / f.name)
    plain = {k: v for k, v in raw.items() if k != "quantization_config"}
    plain["torch_dtype"] = str(dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(plain, indent=2) + "\n")  # the original layout, not our class's
    return dst


def _is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt", ".pth")) or name.endswith(".index.json")
