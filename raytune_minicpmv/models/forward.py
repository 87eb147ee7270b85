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
    if "pixel_values" in inputs:
        return model(**inputs, use_cache=False).logits
    return _text_only(model, inputs, downsample_mode)


def _text_only(model, inputs: dict, downsample_mode: Optional[str]) -> torch.Tensor:
    """A batch without images, with the vision tower and connector still run once on a dummy 4x4-patch crop whose
    contribution is exactly 0 (as the 2.x modeling does): under ZeRO-3 every rank must gather the same modules in
    the same order and every trained tensor must get a gradient on every rank, else a rank with an image batch and
    one without fall out of step. The dummy runs INSIDE the model's forward (a pre-hook on the language model,
    ahead of DeepSpeed's own hook there): after the embedding lookup and before the LLM, the place where an image
    batch runs its vision tower; calling a module outside the engine's forward would desynchronise the ranks."""
    core = getattr(model, "module", model)  # a DeepSpeed engine's model
    base = core.get_base_model() if hasattr(core, "get_base_model") else core  # under PEFT
    vlm = base.model  # MiniCPMV4_6Model / MiniCPMV4_7Model: get_image_features + language_model
    dummy = []

    def run_dummy_crop(module, args, kwargs):
        ref = kwargs.get("inputs_embeds")
        pixels = ref.new_zeros((1, 3, 14, 16 * 14))  # one crop of 4x4 patches: 1 token after the 4x + 4x merges
        sizes = torch.tensor([[4, 4]], dtype=torch.int32, device=ref.device)
        out = vlm.get_image_features(pixels, sizes, downsample_mode=downsample_mode).pooler_output
        dummy.append(torch.cat(list(out)).sum())

    handle = vlm.language_model.register_forward_pre_hook(run_dummy_crop, with_kwargs=True, prepend=True)
    try:
        logits = model(**inputs, use_cache=False).logits
    finally:
        handle.remove()
    return logits + 0.0 * dummy[0]


def family_supports_packing(family: str) -> bool:
    """Whether several samples may share one sequence (`data.packing`) for this family: `packing.packing_refusal`
    decides (not for 4.6 / 4.7, registry.V4_NO_PACKING says why)."""
    from .packing import packing_refusal

    return packing_refusal(family) is None
