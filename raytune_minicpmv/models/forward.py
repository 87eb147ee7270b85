"""One forward call per family, for the training loop, evaluation and merge verification.

    logits = forward_logits(engine_or_model, batch, "minicpmv4_6", downsample_mode="16x")
    loss_sum, n_tokens = compute_loss(logits, batch["labels"])

2.x (our modeling): `model(batch)` with the collate dict. 4.6 / 4.7 (transformers' classes): the batch is exactly
what `MiniCPMV4_6Processor` / `MiniCPMV4_7Processor` return (input_ids, attention_mask, packed pixel_values,
target_sizes; 4.7 also mm_token_type_ids) plus `labels` (and the collate's `num_images`, for the throughput
meter); the model gets every other key as keyword arguments (the loss is ours: a sum and a token count, normalised
over the global batch by the caller), plus `downsample_mode` (`model.downsample_mode`, the same the data stage gave
the processor; None: the checkpoint's config decides) and `use_cache=False` (no KV / recurrent-state cache).
"""
from __future__ import annotations

from typing import Optional

import torch

NOT_MODEL_INPUTS = ("labels", "num_images")  # batch keys for the loss / the meters, not for the 4.x forward


def forward_logits(model, batch: dict, family: str, downsample_mode: Optional[str] = None) -> torch.Tensor:
    """Logits of `model` (a module, PEFT model or DeepSpeed engine) on one collated batch of `family`."""
    from .registry import get_family

    if not get_family(family).hf_native:
        return model(batch).logits
    inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
    if downsample_mode is not None:
        inputs["downsample_mode"] = downsample_mode
    return model(**inputs, use_cache=False).logits


def family_supports_packing(family: str) -> bool:
    """Whether several samples may share one sequence (`data.packing`) for this family.

    Not for 4.6 / 4.7: 3 of 4 LLM layers are Gated-DeltaNet linear attention, whose causal convolution and
    recurrent state run along the whole sequence. Packing separates samples for attention only (masks/positions);
    it hands those layers no per-sample boundaries, so packed samples would read each other's state: silent
    cross-talk. Until boundaries reach the linear-attention kernels too, such families train unpacked.
    """
    from .registry import get_family

    return not get_family(family).hf_native
