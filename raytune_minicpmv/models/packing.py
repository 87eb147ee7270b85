"""Packed rows in the LLM: which families may train on them, and the attention backends over them.

    why = packing_refusal("minicpmv2_6")          # None: supported; else the reason (config validation shows it)
    backend = resolve_packed_attention("auto", on_gpu=True, dtype=torch.bfloat16)   # -> "varlen"
    use_packed_attention(model, backend)          # the LLM's attention for packed batches (sdpa | flex | varlen)
    out = model.llm(inputs_embeds=..., position_ids=..., **packed_llm_kwargs(batch))

A packed row holds several samples back to back; `position_ids` restart at 0 for every sample. transformers'
own mechanism does the rest for the sdpa, eager and flex backends: with no `attention_mask` and no cache,
`masking_utils.create_causal_mask` finds the sample boundaries from the restarting positions
(`find_packed_sequence_indices`) and builds a causal mask that is also block-diagonal (a bool `[B, 1, L, L]` for
SDPA: the exact path CI runs on CPU; a FlexAttention `BlockMask` document mask for `flex_attention`).
flash_attention_2 reads the same positions (`_is_packed_sequence`) or the `cu_seq_lens_*` kwargs.

`varlen` is our one addition: torch's `torch.nn.attention.varlen.varlen_attn`, registered in transformers'
`AttentionInterface` under `VARLEN`, fed with the `cu_seq_lens_q/k` + `max_length_q/k` kwargs (transformers'
`FlashAttentionKwargs`, passed down to every attention call) that `packed_llm_kwargs` derives from the batch. It
has no mask function registered, so transformers builds no mask for it. torch 2.11's varlen_attn has no GQA (K/V
are repeated to the query heads) and no `is_causal` (causal is `window_size=(-1, 0)`); it runs on CUDA only.
"""
from __future__ import annotations

from typing import Optional

import torch

VARLEN = "raytune_varlen"
BACKENDS = {"sdpa": "sdpa", "flex": "flex_attention", "varlen": VARLEN}


def packing_refusal(family: str) -> Optional[str]:
    """Why `family` cannot train on packed rows, or None when it can: the one place that decides.

    Native 2.x families (full causal attention in a transformers LLM) can; a family whose model loads through
    remote code (`blocked`) or that says why not (`ModelFamily.no_packing`, e.g. linear-attention layers carrying
    state across the row) cannot. An unknown name is None here: model.family's own check reports it.
    """
    from .registry import FAMILIES

    fam = FAMILIES.get(family)
    if fam is None:
        return None
    if fam.blocked:
        return "it loads through its remote code, which knows no packed rows"
    return fam.no_packing


def resolve_packed_attention(choice: str, on_gpu: bool, dtype: torch.dtype) -> str:
    """`model.packed_attention` for this process: `auto` is varlen on a CUDA device in bf16/fp16 (fastest of the
    three on the H200, docs/PERFORMANCE.md "Packing"), else sdpa (exact everywhere, the CPU path)."""
    if choice != "auto":
        return choice
    half = dtype in (torch.bfloat16, torch.float16)
    return "varlen" if on_gpu and torch.cuda.is_available() and half else "sdpa"


def use_packed_attention(model: torch.nn.Module, backend: str) -> None:
    """Set the attention implementation of the model's LLM (not the vision tower) for packed batches."""
    if backend not in BACKENDS:
        raise ValueError(f"packed attention {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "varlen":
        _register_varlen()
    llm = model.get_base_model().llm if hasattr(model, "get_base_model") else model.llm
    # every attention layer and the mask builder read this one shared config object at call time
    llm.config._attn_implementation = BACKENDS[backend]
    llm.model.config._attn_implementation = BACKENDS[backend]


def packed_llm_kwargs(batch: dict) -> dict:
    """The LLM's varlen kwargs for a packed batch (`cu_seq_lens` from the collate), {} for a padded one."""
    cu = batch.get("cu_seq_lens")
    if cu is None:
        return {}
    cu = cu.to(torch.int32)
    longest = int(batch["max_seq_len"])
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                             dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-function contract: q/k/v `[B, H, L, D]` → (`[B, L, H, D]`, None).

    The B rows are flattened into one token stream; `cu_seq_lens_q` gives the sample starts in that stream.
    """
    from torch.nn.attention.varlen import varlen_attn

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise ValueError("varlen attention needs a packed batch (cu_seq_lens from data.packing's collate)")
    if dropout:
        raise ValueError("varlen attention: attention dropout is not supported")
    b, h, length, d = query.shape
    groups = h // key.shape[1]
    if groups > 1:  # no GQA in varlen_attn (torch 2.11): repeat the K/V heads to the query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    q, k, v = (t.transpose(1, 2).reshape(b * length, h, d) for t in (query, key, value))
    longest = int(kwargs["max_length_q"])
    out = varlen_attn(q, k, v, cu.to(torch.int32), cu.to(torch.int32), longest, longest, scale=scaling,
                      window_size=(-1, 0))
    return out.reshape(b, length, h, d), None


def _register_varlen() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)


__all__ = ["BACKENDS", "VARLEN", "packing_refusal", "resolve_packed_attention", "use_packed_attention", "packed_llm_kwargs",
           "varlen_attention_forward"]
