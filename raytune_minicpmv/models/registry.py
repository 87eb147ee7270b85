"""Model families by name, family detection from a checkpoint, and the strict loader.

    from raytune_minicpmv.models import get_family, load_model
    fam = get_family("minicpmv2_6")            # or get_family("/path/to/ckpt") (reads config.json)
    model = load_model("/path/to/ckpt", dtype=torch.bfloat16)

`load_model` reads `config.json` itself, so a real MiniCPM-V checkpoint (`model_type: minicpmv` + `auto_map` to
remote code) loads into our native class WITHOUT `trust_remote_code`; weights come through transformers'
`from_pretrained` (sharded safetensors with `model.safetensors.index.json`, or `pytorch_model*.bin`), and any
missing/unexpected/mis-shaped key is one error listing them all. A checkpoint of a family we do not implement loads
through its own remote code only when `trust_remote_code=True` (off by default; a run sets it with
`model.trust_remote_code: true`, which `load_model_for(cfg.model)` passes on), with a warning.

MiniCPM-V 4.6 / 4.7 (`model_type` minicpmv4_6 / minicpmv4_7) are shipped by transformers itself: those families
(`hf_native`) load with transformers' `MiniCPMV4_6ForConditionalGeneration` / `MiniCPMV4_7ForConditionalGeneration`
(no re-implementation, no remote code), equally strict about keys; `models/forward.py` calls them per family.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import transformers
from transformers import AutoConfig, AutoModel

from .configuration import MiniCPMV25Config, MiniCPMV26Config, MiniCPMVConfig
from .modeling import MiniCPMV25, MiniCPMV26, MiniCPMVBase

log = logging.getLogger(__name__)


def _hf_class(name: str):
    """A class transformers ships from some release on, or None on an older one (its lazy module raises
    ImportError / RuntimeError / AttributeError for a name it lacks, depending on the release)."""
    try:
        return getattr(transformers, name)
    except Exception:  # noqa: BLE001 - any failure means: not usable in this install
        return None


# transformers 5.7 - 5.18 ship MiniCPM-V 4.6 (5.18: 4.7 too), but their ViT window merger reshapes all crops of a
# micro-batch as if each had the first one's size ("assumes uniform per-image sizes"): any sliced image's crops
# differ, so training fails with a shape error (seen on the GPU machine's 5.17). 5.19 merges per window.
V4_MIN_TRANSFORMERS = "5.19"


def _v4_blocked(config_class: str, installed: Optional[str] = None) -> Optional[str]:
    """Why a 4.x family cannot run on this transformers (None: it can); an older one still runs 2.x."""
    from packaging.version import Version

    installed = installed or transformers.__version__
    need = f"needs transformers >= {V4_MIN_TRANSFORMERS} (installed: {installed}"
    if _hf_class(config_class) is None:
        return f"{need}, which does not ship {config_class})"
    if Version(installed) < Version(V4_MIN_TRANSFORMERS):
        return f"{need}, whose vision merger assumes every crop of a micro-batch has one size)"
    return None


@dataclass(frozen=True)
class ModelFamily:
    name: str
    version: str  # the `version` field of the remote-code config.json (4.x: informative only)
    llm_type: str  # chat template family used by the data stage (qwen2 = ChatML, also Qwen3.5's)
    config_class: Optional[type] = None
    model_class: Optional[type] = None
    blocked: Optional[str] = None  # why the family cannot be built natively (None: supported)
    # why it cannot train on packed rows (data.packing), e.g. linear-attention layers whose state would run from
    # one sample into the next; None: supported. Read only through models.packing.packing_refusal
    no_packing: Optional[str] = None
    # True: transformers ships the model (4.6/4.7): keyword-argument forward with the processor's batch, the
    # `model.*` layout, loaded with the transformers class itself. False: our own 2.x modeling (batch-dict forward).
    hf_native: bool = False
    lora_targets: str = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    vision_lora_targets: str = r"vpm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"

    def check_supported(self) -> None:
        if self.blocked:
            raise NotImplementedError(f"model family {self.name}: {self.blocked}")


# 4.6/4.7: the LLM is hybrid (Qwen3.5: 3 of 4 layers Gated-DeltaNet `linear_attn`, every 4th `self_attn`), so
# the default LoRA targets are the token-mixing projections of BOTH layer kinds (q/k/v/o of full attention; the
# fused q-k-v input, the output-gate input `in_proj_z` and `out_proj` of linear attention) — attention-only LoRA
# on `self_attn` would adapt just a quarter of the layers. Left out: the per-head scalars `in_proj_a`/`in_proj_b`
# (a handful of rows each), the depthwise `conv1d`, the MLPs (add `mlp\.(gate_proj|up_proj|down_proj)` for more).
V4_LORA_TARGETS = (r"model\.language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)"
                   r"|linear_attn\.(in_proj_qkv|in_proj_z|out_proj))")
V4_VISION_LORA_TARGETS = r"model\.vision_tower\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"

# 4.6 / 4.7: 3 of 4 LLM layers are Gated-DeltaNet linear attention, whose causal convolution and recurrent state
# run along the whole sequence; packing separates samples for attention only (masks / positions), so packed samples
# would read each other's state (silent cross-talk). Until boundaries reach those kernels, they train unpacked.
V4_NO_PACKING = ("a hybrid LLM: its Gated-DeltaNet linear-attention layers carry state across tokens and get no "
                 "sample boundaries, so packed samples would leak into each other")

FAMILIES: dict[str, ModelFamily] = {
    "minicpmv2_6": ModelFamily("minicpmv2_6", "2.6", "qwen2", MiniCPMV26Config, MiniCPMV26),
    "minicpmv2_5": ModelFamily("minicpmv2_5", "2.5", "llama3", MiniCPMV25Config, MiniCPMV25),
    "minicpmv2_0": ModelFamily(
        "minicpmv2_0", "2.0", "minicpm",
        blocked="not implemented natively: its vision tower is a timm ViT (`vpm.blocks.*`, `vpm.pos_embed`; timm is "
                "not a dependency) and its LLM is MiniCPM-2.4B (muP `scale_emb`/`scale_depth`), which transformers "
                "does not ship; load it with model.trust_remote_code=true (needs timm and transformers<4.42)"),
    **{name: ModelFamily(name, version, "qwen2", _hf_class(f"MiniCPMV{v_}Config"),
                         _hf_class(f"MiniCPMV{v_}ForConditionalGeneration"), hf_native=True,
                         lora_targets=V4_LORA_TARGETS, vision_lora_targets=V4_VISION_LORA_TARGETS,
                         no_packing=V4_NO_PACKING,
                         blocked=_v4_blocked(f"MiniCPMV{v_}Config"))
       for name, version, v_ in (("minicpmv4_6", "4.6", "4_6"), ("minicpmv4_7", "4.7", "4_7"))},
}

for _fam in FAMILIES.values():
    if _fam.config_class is not None and not _fam.hf_native:  # transformers registers its own
        AutoConfig.register(_fam.config_class.model_type, _fam.config_class, exist_ok=True)
        AutoModel.register(_fam.config_class, _fam.model_class, exist_ok=True)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as asked (one message with every problem)."""


def read_config_json(path: str | Path) -> dict:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    return json.loads(cfg_path.read_text())


def detect_family(raw: dict) -> Optional[str]:
    """Family name for a config.json dict, or None when it is not a MiniCPM-V 2.x we know."""
    for fam in FAMILIES.values():
        if fam.config_class is not None and raw.get("model_type") == fam.config_class.model_type:
            return fam.name
    if raw.get("model_type") != "minicpmv":
        return None
    version = str(raw.get("version", "")).strip()
    for fam in FAMILIES.values():
        if version == fam.version and not fam.hf_native:
            return fam.name
    if not version and raw.get("hidden_size") == 2304 and raw.get("query_num", 64) == 64:
        return "minicpmv2_0"  # vLLM's rule: 2.0 has no version field
    return None


def get_family(name_or_path: str | Path) -> ModelFamily:
    """A family by registry name, or the family of a checkpoint directory."""
    key = str(name_or_path)
    if key in FAMILIES:
        return FAMILIES[key]
    if Path(key).is_dir():
        raw = read_config_json(key)
        name = detect_family(raw)
        if name is None:
            raise CheckpointError(f"{key}: config.json (model_type={raw.get('model_type')!r}, "
                                  f"version={raw.get('version')!r}) is not a MiniCPM-V family we implement "
                                  f"({', '.join(FAMILIES)})")
        return FAMILIES[name]
    raise KeyError(f"unknown model family {key!r}: expected one of {', '.join(FAMILIES)} or a checkpoint directory")


def load_model(path: str | Path, dtype: torch.dtype | str = torch.bfloat16, trust_remote_code: bool = False,
               attn_implementation: str = "sdpa", quantization: str = "none", device=None) -> torch.nn.Module:
    """Load a checkpoint directory into the native model of its family (strict about keys).

    `quantization` nf4 / int8: bitsandbytes LLM linear layers (quantized here on `device`, default cpu, or read
    as a pre-quantized checkpoint lays them out; models/quantization.py)."""
    from .quantization import KEEP_BY_FAMILY, cast_unquantized, from_pretrained_kwargs, keep_unquantized

    dtype = as_torch_dtype(dtype)
    raw = read_config_json(path)
    name = detect_family(raw)
    quant_kwargs = from_pretrained_kwargs(raw, quantization, dtype, device or "cpu",
                                          **({"keep": keep_unquantized(name)} if name in KEEP_BY_FAMILY else {}))
    if name is None or FAMILIES[name].blocked:
        return _load_remote_code(path, raw, name, dtype, trust_remote_code, quant_kwargs)
    family = FAMILIES[name]
    if family.hf_native:
        model = _load_hf_native(path, family, dtype, attn_implementation, quant_kwargs)
        return cast_unquantized(model, dtype) if quant_kwargs else model
    config = family.config_class.from_checkpoint_dict(raw)
    model, info = family.model_class.from_pretrained(
        str(path), config=config, dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True,
        **quant_kwargs)
    problems = [f"{kind}: {', '.join(sorted(keys))}" for kind, keys in
                (("missing keys", info.get("missing_keys")), ("unexpected keys", info.get("unexpected_keys")),
                 ("mismatched shapes", [str(k) for k in info.get("mismatched_keys") or []])) if keys]
    if problems:
        raise CheckpointError(f"{path} does not match {family.name} (config.json says "
                              f"{config.vision_layers} vision layers, {config.num_hidden_layers} LLM layers):\n  "
                              + "\n  ".join(problems))
    return cast_unquantized(model, dtype) if quant_kwargs else model


def _load_hf_native(path, family: ModelFamily, dtype: torch.dtype, attn_implementation: str,
                    quant_kwargs: Optional[dict] = None) -> torch.nn.Module:
    """4.6/4.7: transformers' own class and config; strict about keys like the 2.x path (a tied `lm_head` is no
    missing key: transformers ties it to `model.language_model.embed_tokens` when the config says so)."""
    model, info = family.model_class.from_pretrained(
        str(path), dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True,
        **(quant_kwargs or {}))
    problems = [f"{kind}: {', '.join(sorted(keys))}" for kind, keys in
                (("missing keys", info.get("missing_keys")), ("unexpected keys", info.get("unexpected_keys")),
                 ("mismatched shapes", [str(k) for k in info.get("mismatched_keys") or []])) if keys]
    if problems:
        text = model.config.text_config
        raise CheckpointError(f"{path} does not match {family.name} (config.json says "
                              f"{model.config.vision_config.num_hidden_layers} vision layers, "
                              f"{text.num_hidden_layers} LLM layers):\n  " + "\n  ".join(problems))
    return model


def load_model_for(model_cfg, dtype: torch.dtype | str | None = None, device=None) -> torch.nn.Module:
    """`load_model` as a run config asks (config.ModelConfig): path, dtype, attn_implementation, trust_remote_code,
    quantization (bitsandbytes layers placed on `device`: this rank's GPU, or cpu)."""
    return load_model(model_cfg.path, dtype=model_cfg.dtype if dtype is None else dtype,
                      trust_remote_code=model_cfg.trust_remote_code,
                      attn_implementation=model_cfg.attn_implementation,
                      quantization=getattr(model_cfg, "quantization", "none"), device=device)


def _load_remote_code(path, raw: dict, name: Optional[str], dtype: torch.dtype, trust_remote_code: bool,
                      quant_kwargs: Optional[dict] = None):
    what = f"family {name}: {FAMILIES[name].blocked}" if name else \
        f"model_type={raw.get('model_type')!r} version={raw.get('version')!r} is not a family we implement"
    if not trust_remote_code:
        raise CheckpointError(f"{path}: {what}. Set model.trust_remote_code=true to run the checkpoint's own "
                              "Python code (only for checkpoints you trust)")
    log.warning("%s: %s; model.trust_remote_code=true: loading it with AutoModel.from_pretrained("
                "trust_remote_code=True) — the checkpoint's own Python code runs, and raytune_minicpmv checks "
                "neither its keys nor its batch contract", path, what)
    try:
        return AutoModel.from_pretrained(str(path), trust_remote_code=True, dtype=dtype, **(quant_kwargs or {}))
    except Exception as e:  # noqa: BLE001 - whatever the remote code raises, say which path it was
        raise CheckpointError(f"{path}: loading with the checkpoint's own code (model.trust_remote_code=true) failed: "
                              f"{type(e).__name__}: {e}") from e


def as_torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The config's dtype names (bf16/fp16/fp32, or torch's own names) as a torch dtype: the one mapping."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16, "float32": torch.float32}[dtype]


def is_native(model: torch.nn.Module) -> bool:
    return isinstance(model, MiniCPMVBase)


def family_of_model(model: torch.nn.Module) -> Optional[str]:
    """The family of a loaded model (PEFT-wrapped or not) from its config's model_type; None when unknown."""
    config = getattr(model, "config", None)
    return detect_family(config.to_dict()) if config is not None else None


__all__ = ["FAMILIES", "ModelFamily", "CheckpointError", "MiniCPMVConfig", "get_family", "load_model", "load_model_for",
           "detect_family", "read_config_json", "is_native", "as_torch_dtype", "family_of_model"]
