"""A trained adapter as "what to do to each base checkpoint tensor": fold a LoRA delta in, or replace it.

    adapter = read_adapter("ckpt/adapter", base_keys=set(CheckpointReader(base).keys()))
    adapter.lora["llm.model.layers.0.self_attn.q_proj.weight"]   # LoraFactors(a_key, b_key, scaling, ...)
    adapter.replacements["resampler.query"]                        # key of the trained tensor in adapter.tensors
    merged = fold_lora(base_weight, adapter.lora[key], adapter.tensors, out_dtype)

Accepted inputs (all keyed by the base checkpoint's tensor names, which for our models are the module names):
- PEFT LoRA dirs (`adapter_config.json` + `adapter_model.safetensors`/`.bin`), with or without `task_type`: keys
  `base_model.model.<module>.lora_A.weight` / `lora_B.weight` (optionally with the adapter name before `.weight`),
  `lora_embedding_A/B` for embeddings, `lora_B.bias` (lora_bias), and full tensors for `modules_to_save` /
  `bias="all"|"lora_only"` (`base_model.model.<module>.<param>`, optionally `…modules_to_save.<name>.…`).
- the official MiniCPM-V scripts' old side file `vpm_resampler_embedtokens.pt` next to the adapter (applied last,
  as `load_state_dict(strict=False)` did).
- a directory of full trained tensors in checkpoint key names (our `full_model/`, no adapter_config.json).
Anything that cannot be folded exactly into a plain weight (DoRA, weight-modifying inits like PiSSA, …) is refused.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .safetensors_stream import SafetensorsFiles

log = logging.getLogger(__name__)

OLD_SIDE_FILE = "vpm_resampler_embedtokens.pt"
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.(?!weight$|bias$)(?P<name>[^.]+))?(?:\.(?P<param>weight|bias))?$")


class UnsupportedAdapterError(ValueError):
    """The adapter uses a feature that cannot be folded into plain weights (or that we do not implement)."""


@dataclass
class LoraFactors:
    a_key: str = ""
    b_key: str = ""
    embedding: bool = False  # lora_embedding_A [r, vocab] / lora_embedding_B [dim, r]: delta is (B @ A)^T
    scaling: float = 1.0
    fan_in_fan_out: bool = False


@dataclass
class Adapter:
    tensors: "TensorStore"
    lora: dict[str, LoraFactors] = field(default_factory=dict)  # base weight key -> factors
    lora_bias: dict[str, tuple[str, float]] = field(default_factory=dict)  # base bias key -> (lora_B.bias key, scaling)
    replacements: dict[str, str] = field(default_factory=dict)  # base key -> adapter tensor key
    config: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.tensors.nbytes


class TensorStore:
    """Adapter tensors: safetensors files read lazily, plus in-memory dicts (.bin / old .pt side file)."""

    def __init__(self):
        self._files: list[tuple[str, SafetensorsFiles]] = []
        self._memory: dict[str, torch.Tensor] = {}

    def add_files(self, files: SafetensorsFiles, prefix: str) -> list[str]:
        self._files.append((prefix, files))
        return [prefix + k for k in files.keys()]

    def add_memory(self, tensors: dict[str, torch.Tensor], prefix: str) -> list[str]:
        self._memory.update({prefix + k: v for k, v in tensors.items()})
        return [prefix + k for k in tensors]

    def get(self, key: str) -> torch.Tensor:
        if key in self._memory:
            return self._memory[key]
        for prefix, files in self._files:
            if key.startswith(prefix) and key[len(prefix):] in files:
                return files.get(key[len(prefix):])
        raise KeyError(key)

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._memory:
            return tuple(self._memory[key].shape)
        for prefix, files in self._files:
            if key.startswith(prefix) and key[len(prefix):] in files:
                return files.entry(key[len(prefix):]).shape
        raise KeyError(key)

    @property
    def nbytes(self) -> int:
        return (sum(f.total_bytes for _, f in self._files)
                + sum(t.numel() * t.element_size() for t in self._memory.values()))


# --------------------------------------------------------------------------------------------------------------
# Reading


def read_adapter(adapter_dir: str | Path, base_keys: set[str]) -> Adapter:
    """Index an adapter dir against the base checkpoint's keys; raise listing every key that does not fit."""
    adapter_dir = Path(adapter_dir)
    store = TensorStore()
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config:
        _refuse_unsupported(config, adapter_dir)
    keys = _load_weights(adapter_dir, store, prefix="adapter:")
    if not config and not keys:
        raise FileNotFoundError(f"{adapter_dir}: neither a PEFT adapter (adapter_config.json) nor safetensors "
                                "of trained tensors")
    adapter = Adapter(tensors=store, config=config)
    problems: list[str] = []
    for key in keys:
        _classify(key, key[len("adapter:"):], adapter, base_keys, problems)
    side = adapter_dir / OLD_SIDE_FILE
    if side.is_file():  # applied after the adapter, as the official `load_state_dict(strict=False)` was
        log.info("applying old-style %s", side)
        for key in store.add_memory(torch.load(side, map_location="cpu", weights_only=True), prefix="side:"):
            _classify(key, key[len("side:"):], adapter, base_keys, problems, side_file=True)
    if config and not keys:
        problems.append("the adapter holds no tensors (an adapter saved under ZeRO-3 without gathering the "
                        "parameters is empty; see docs/MERGE.md)")
    _check_lora_pairs(adapter, config, problems)
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"adapter {adapter_dir} does not fit the base checkpoint:\n  {shown}")
    return adapter


def _refuse_unsupported(cfg: dict, adapter_dir: Path) -> None:
    refusals = []
    if cfg.get("peft_type", "LORA") != "LORA":
        refusals.append(f"peft_type {cfg['peft_type']} (only LORA is merged)")
    checks = {
        "use_dora": "DoRA (its magnitude vector rescales whole columns; merge with peft's merge_and_unload)",
        "use_qalora": "QA-LoRA", "alora_invocation_tokens": "activated LoRA (aLoRA cannot be merged)",
        "target_parameters": "LoRA on nn.Parameter targets", "layer_replication": "layer replication",
        "trainable_token_indices": "trainable tokens", "megatron_config": "Megatron parallel layers",
        "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
    }
    refusals += [f"{name}: {why}" for name, why in checks.items() if cfg.get(name)]
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and re.match(r"(pissa|olora|corda|loftq|lora_ga)", init, re.I):
        refusals.append(f"init_lora_weights={init!r} changes the base weights at init, so the adapter does not "
                        "apply to the original base (convert it to a plain LoRA with peft first)")
    if refusals:
        raise UnsupportedAdapterError(f"{adapter_dir}: cannot merge this adapter: " + "; ".join(refusals))


def _load_weights(adapter_dir: Path, store: TensorStore, prefix: str) -> list[str]:
    st_files = sorted(adapter_dir.glob("*.safetensors"))
    if st_files:
        return store.add_files(SafetensorsFiles(st_files), prefix)
    binary = adapter_dir / "adapter_model.bin"
    if binary.is_file():
        return store.add_memory(torch.load(binary, map_location="cpu", weights_only=True), prefix)
    return []


def _classify(store_key: str, key: str, adapter: Adapter, base_keys: set[str], problems: list[str],
              side_file: bool = False) -> None:
    """File one adapter tensor under lora / lora_bias / replacements, or report why it fits nowhere."""
    name = key.removeprefix(_PEFT_PREFIX)
    if ".original_module." in name:
        return  # frozen copies of the base that a full PeftModel.state_dict() may contain
    m = _LORA_KEY.match(name)
    if m and not side_file:
        target = m["module"] + ".weight"
        if target not in base_keys:
            problems.append(f"{key}: LoRA targets {target}, which the base checkpoint does not have")
            return
        factors = adapter.lora.setdefault(target, LoraFactors())
        kind, param = m["kind"], m["param"]
        if param == "bias":
            if kind != "lora_B" or m["module"] + ".bias" not in base_keys:
                problems.append(f"{key}: a LoRA bias without a base bias {m['module']}.bias")
            else:
                adapter.lora_bias[m["module"] + ".bias"] = (store_key, 0.0)  # scaling filled in by _check_lora_pairs
            return
        factors.embedding = kind.startswith("lora_embedding")
        if kind.endswith("A"):
            factors.a_key = store_key
        else:
            factors.b_key = store_key
        return
    # Full trained tensors: modules_to_save copies, biases, full_model tensors, the old side file.
    name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name).replace(".base_layer.", ".")
    if name not in base_keys:
        problems.append(f"{key}: trained tensor {name} has no counterpart in the base checkpoint")
        return
    adapter.replacements[name] = store_key


def _check_lora_pairs(adapter: Adapter, cfg: dict, problems: list[str]) -> None:
    """Every LoRA target needs A and B of matching rank; fill in its scaling from the adapter config."""
    from peft.utils.other import get_pattern_key  # PEFT's own rank_pattern/alpha_pattern matching

    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    for target, f in adapter.lora.items():
        if not (f.a_key and f.b_key):
            problems.append(f"{target}: LoRA {'A' if not f.a_key else 'B'} matrix missing")
            continue
        a_shape = adapter.tensors.shape(f.a_key)
        if len(a_shape) != 2 or 0 in a_shape:
            problems.append(f"{target}: lora_A has shape {a_shape}; a 1-D or empty factor means it was saved from "
                            "ZeRO-3 shards without gathering them (re-save under deepspeed.zero.GatheredParameters)")
            continue
        module = target.removesuffix(".weight")
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), cfg.get("r"))
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), cfg.get("lora_alpha"))
        rank = a_shape[0]
        if r is None or alpha is None:
            problems.append(f"{target}: adapter_config.json gives no r / lora_alpha")
            continue
        if r != rank:
            problems.append(f"{target}: lora_A has rank {rank} but adapter_config.json says r={r} "
                            "(rank_pattern mismatch)")
            continue
        f.scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        f.fan_in_fan_out = bool(cfg.get("fan_in_fan_out")) and not f.embedding
    for bias_key, (store_key, _) in list(adapter.lora_bias.items()):
        weight = bias_key.removesuffix(".bias") + ".weight"
        adapter.lora_bias[bias_key] = (store_key, adapter.lora[weight].scaling if weight in adapter.lora else 1.0)


# --------------------------------------------------------------------------------------------------------------
# The math


def lora_delta(f: LoraFactors, tensors: TensorStore) -> torch.Tensor:
    """(B @ A) * scaling in fp32, transposed where PEFT transposes (fan_in_fan_out layers, embeddings)."""
    a = tensors.get(f.a_key).float()
    b = tensors.get(f.b_key).float()
    delta = b @ a
    if f.fan_in_fan_out or f.embedding:
        delta = delta.T
    # Same operation order as PEFT's get_delta_weight, so an fp32 merge equals merge_and_unload bit for bit.
    return delta * f.scaling


def merged_tensor(key: str, base: torch.Tensor | None, adapter: Adapter, out_dtype: torch.dtype) -> torch.Tensor:
    """The output value of one checkpoint tensor, then cast: the trained copy if the adapter has one, else the base;
    plus the LoRA delta (in fp32) where the tensor is a LoRA target. Both apply when PEFT saved an embedding's base
    weights next to its LoRA factors (`save_embedding_layers`, e.g. after resizing the vocabulary)."""
    if key in adapter.replacements:
        t = adapter.tensors.get(adapter.replacements[key])
        if base is not None and tuple(t.shape) != tuple(base.shape):
            raise ValueError(f"{key}: trained copy has shape {tuple(t.shape)}, base has {tuple(base.shape)}")
    else:
        t = base
    if key in adapter.lora:
        t = t.to(torch.float32, copy=True)  # copy: never modify a tensor an in-memory store still holds
        delta = lora_delta(adapter.lora[key], adapter.tensors)
        if delta.shape != t.shape:
            raise ValueError(f"{key}: LoRA delta has shape {tuple(delta.shape)}, base weight {tuple(t.shape)}")
        t += delta
        if not torch.isfinite(t).all():
            raise ValueError(f"{key}: the merged weight has NaN/inf; the adapter looks broken")
    elif key in adapter.lora_bias:
        store_key, scaling = adapter.lora_bias[key]
        t = t.float() + adapter.tensors.get(store_key).float() * scaling
    return t.to(out_dtype) if t.is_floating_point() else t
