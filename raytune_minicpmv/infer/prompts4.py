"""MiniCPM-V 4.6 / 4.7 generation prompts: 4.x training rows (data/rows4.py) cut before the last assistant turn.

    info = Spec4("minicpmv4_6", ckpt).load()                              # transformers' processor of the checkpoint
    rows = preprocess_records4(slotted_raws, info, "minicpmv4_6", 2048)   # the training rows path (prompts.py calls it)
    prompts = [prompt4_of(r, has) for r, has in zip(table_rows(rows), has_answers)]
    batch = prompt_batch4(prompts, downsample_mode="16x")                 # left-padded processor batch: model.generate

The same cut as 2.x (prompts.prompt_of): a row's pre-shifted labels mark the trained tokens, their last contiguous
run is the last answer (+ `<|im_end|>`), everything before it is what the model saw before that answer in training.
For 4.x that is the family's chat template rendered by `data.family4.encode_record4` and tokenized by the family's
processor (image placeholders expanded, slices, `<image_id>`), including what the template writes between the
assistant header and the answer: for a plain answer the checkpoint's non-thinking prefix (the tiny and the Qwen3.5
templates: an empty ``<think>\\n\\n</think>\\n\\n``), i.e. the template's own generation prompt with
`enable_thinking=False` (tests/unit/infer/test_prompts4.py checks both). A record whose answer wrote a think block
trained the whole turn body, so its prompt ends at the header and the model writes the think block itself.

The crops of the images inside the prompt are the first columns of the row's packed `[3, 14, ΣN]` pixels (the
processor packs crops in text order), their `target_sizes` the first rows; 4.7's `mm_token_type_ids` are cut with
the ids. The batch is what the processor returns for a left-padded batch (`padding_side="left"`): all crops of all
samples packed into one `[1, 3, 14, ΣN]` tensor in sample order (the model scatters image features onto the image
tokens in that order) and `target_sizes` concatenated; neither key without an image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


@dataclass
class Prompt4:
    id: str
    input_ids: np.ndarray  # int64 [L]: the conversation up to the assistant answer (header + template prefix)
    pixel_values: np.ndarray  # float32 [3, 14, N]: the packed crops of the images inside the prompt
    target_sizes: np.ndarray  # int32 [n_crops, 2]
    mm_token_type_ids: Optional[np.ndarray]  # int64 [L] for 4.7, else None
    reference_ids: np.ndarray  # int64: the cut answer (content + end marker); the placeholder for a question
    has_reference: bool = True
    pad_token_id: int = 0


def is_row4(row: dict) -> bool:
    """Whether a row (a dict of one row's columns) is a 4.6 / 4.7 row (ROW_SCHEMA4 has a `family` column)."""
    return str(row.get("family", "")).startswith("minicpmv4_")


def answer_start(row: dict) -> tuple[int, int]:
    """[start, end) of the last contiguous run of trained tokens: the last assistant answer and its end marker."""
    labels = np.asarray(row["labels"], dtype=np.int64)
    trained = np.flatnonzero(labels != -100) + 1  # labels are pre-shifted: labels[t] is the target of token t+1
    if len(trained) == 0:
        raise ValueError(f"row {row.get('id')!r} has no assistant token to generate")
    breaks = np.flatnonzero(np.diff(trained) > 1)
    start = int(trained[breaks[-1] + 1] if len(breaks) else trained[0])
    return start, int(trained[-1]) + 1


def prompt4_of(row: dict, has_reference: bool = True, patch_size: int = 14) -> Prompt4:
    """Cut one 4.x training row (a dict of ROW_SCHEMA4 columns) before its last assistant turn."""
    from ..data.rows4 import _unpack

    ids = np.asarray(row["input_ids"], dtype=np.int64)
    start, end = answer_start(row)
    sizes = np.asarray(row["tgt_sizes"], dtype=np.int32).reshape(-1, 2)
    bounds = np.asarray(row["image_bound"], dtype=np.int64).reshape(-1, 2)
    keep = int(np.sum(bounds[:, 1] <= start))  # crops are in text order: those of images inside the prompt
    if len(sizes):
        pixels = _unpack(row["pixel_values"], str(row["pixel_dtype"]), sizes, patch_size)
        columns = int(sum(int(h) * int(w) for h, w in sizes[:keep])) * patch_size
        pixels = np.ascontiguousarray(pixels[:, :, :columns])
    else:
        pixels = np.zeros((3, patch_size, 0), np.float32)
    mm = row.get("mm_token_type_ids")
    mm = np.asarray(mm, dtype=np.int64)[:start] if str(row["family"]) == "minicpmv4_7" else None
    return Prompt4(str(row["id"]), ids[:start], pixels, sizes[:keep], mm, ids[start:end], has_reference,
                   int(row.get("pad_token_id", 0)))


def prompt_batch4(prompts: list[Prompt4], downsample_mode: Optional[str] = None) -> dict:
    """Left-padded processor batch of `prompts` for the family's `generate` (see the module doc)."""
    width = max(len(p.input_ids) for p in prompts)
    pad = prompts[0].pad_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    mm = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        n = len(p.input_ids)
        ids[i, width - n:] = torch.from_numpy(p.input_ids)
        mask[i, width - n:] = 1
        if p.mm_token_type_ids is not None:
            mm[i, width - n:] = torch.from_numpy(p.mm_token_type_ids)
    batch = {"input_ids": ids, "attention_mask": mask}
    if prompts[0].mm_token_type_ids is not None:
        batch["mm_token_type_ids"] = mm
    if any(len(p.target_sizes) for p in prompts):
        batch["pixel_values"] = torch.from_numpy(np.concatenate([p.pixel_values for p in prompts], axis=-1)[None])
        batch["target_sizes"] = torch.from_numpy(np.concatenate([p.target_sizes for p in prompts], axis=0))
    if downsample_mode is not None:
        batch["downsample_mode"] = downsample_mode
    return batch
