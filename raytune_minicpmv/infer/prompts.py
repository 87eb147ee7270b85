"""Generation prompts made by the training preprocessing itself, so train and infer inputs agree token for token.

    raws = [chat_record(["cat.jpg"], "What is this?")]                     # or records of a data file
    rows, has = prompt_rows(raws, spec, tok, max_length=2048)               # data.rows.preprocess_records
    prompts = [prompt_of(r, h) for r, h in zip(table_rows(rows), has)]      # Prompt(input_ids, ..., reference_ids)
    batch = prompt_batch(prompts)                                           # left-padded model batch for generate

A prompt is a training row cut where the last assistant turn starts: the row's pre-shifted labels mark the trained
tokens, and their last contiguous run is that turn's content + end marker. Everything before it is exactly what the
model saw before the answer during training (system prompt, image placeholders, ChatML / Llama 3 headers,
"assistant\\n"), so nothing here renders a template a second time. A record without an answer (a question to ask)
gets a one-token placeholder answer first (`with_answer_slot`), cut off again. The cut answer is the `reference`
(eval metrics). The eval split inside the Train workers is already such rows (Ray Data numpy batches): `prompt_of`
reads them too. MiniCPM-V 4.6 / 4.7 (`spec` a `data.family4.Spec4`, `tok` its `Processor4Info`): the same functions
go through the 4.x rows path (`data.rows4`) and return `prompts4.Prompt4` / the processor's batch (prompts4.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch

from ..data.records import RawRecord
from ..data.rows import preprocess_records, rows_to_table, table_to_numpy, unpack_pixels
from .prompts4 import Prompt4, answer_start, is_row4, prompt4_of, prompt_batch4

PLACEHOLDER_ANSWER = "x"  # a single letter: never merges with the template's "\n" before it (tested)


@dataclass
class Prompt:
    id: str
    input_ids: np.ndarray  # int64 [L]: the conversation up to and including the assistant header
    pixel_values: list  # float32 [3, 14, N*14] per crop of the images inside the prompt
    tgt_sizes: np.ndarray  # int32 [n_crops, 2]
    image_bound: np.ndarray  # int64 [n_crops, 2]
    reference_ids: np.ndarray  # int64: the cut answer (content + end marker); the placeholder for a question
    has_reference: bool = True


def with_answer_slot(raw: RawRecord) -> tuple[RawRecord, bool]:
    """A record whose last turn is a user question gets a placeholder assistant turn (the training format needs an
    answer). Returns the record and whether it had its own answer (a reference). Unreadable JSON is left as it is:
    parse_record reports it."""
    if raw.error:
        return raw, True
    try:
        data = json.loads(raw.text)
        conv = data["conversations"]
        ends_with_question = isinstance(conv, list) and conv and isinstance(conv[-1], dict) and \
            conv[-1].get("role") == "user"
    except (ValueError, KeyError, TypeError):
        return raw, True
    if not ends_with_question:
        return raw, True
    data["conversations"] = conv + [{"role": "assistant", "content": PLACEHOLDER_ANSWER}]
    return RawRecord(raw.source, raw.index, json.dumps(data, ensure_ascii=False)), False


def chat_record(images: list[str], question: str, history: Iterable[tuple[str, str]] = (),
                system: Optional[str] = None, record_id: str = "chat") -> RawRecord:
    """A question (after earlier (question, answer) turns) about `images`, as a fine-tune format record. The images
    go into the first user turn, in order, one per line before its text (what training records with tags do)."""
    turns = [*history, (question, None)]
    first = turns[0][0]
    if len(images) > 1:
        first = "\n".join(f"<image_{k:02d}>" for k in range(len(images))) + "\n" + first
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"role": "user", "content": first if i == 0 else q})
        if a is not None:
            conv.append({"role": "assistant", "content": a})
    record: dict = {"id": record_id, "conversations": conv}
    if len(images) == 1:
        record["image"] = images[0]
    elif images:
        record["image"] = {f"<image_{k:02d}>": p for k, p in enumerate(images)}
    if system is not None:
        record["system"] = system
    return RawRecord("<chat>", 0, json.dumps(record, ensure_ascii=False))


def prompt_rows(raws: list[RawRecord], spec, tok, max_length: int, on_bad_record: str = "error"):
    """The training rows of `raws` (placeholder answers added) and, per row, whether it had its own answer.
    Bad records raise `BadRecord` (on_bad_record="error") or come back as tombstone rows (skip_reason set).
    4.6 / 4.7: `spec` is the run's `Spec4` and `tok` its `Processor4Info` (the 4.x rows path, data/rows4.py)."""
    from ..data.family4 import Spec4

    slotted = [with_answer_slot(r) for r in raws]
    if isinstance(spec, Spec4):
        from ..data.rows4 import preprocess_records4

        rows = preprocess_records4([r for r, _ in slotted], tok, spec.family, max_length, on_bad_record)
        return rows, [has for _, has in slotted]
    rows = preprocess_records([r for r, _ in slotted], spec, tok, max_length=max_length, on_bad_record=on_bad_record)
    return rows, [has for _, has in slotted]


def table_rows(rows, patch_size: int = 14) -> list[dict]:
    """Rows -> one dict of numpy values per row: the layout of a Ray Data numpy batch (what the workers see)."""
    from ..data.rows4 import Row4, rows_to_table4

    table = rows_to_table4(rows) if rows and isinstance(rows[0], Row4) else rows_to_table(rows, patch_size)
    cols = table_to_numpy(table)
    return [{k: v[i] for k, v in cols.items()} for i in range(len(rows))]


def prompt_of(row: dict, has_reference: bool = True, patch_size: int = 14) -> Prompt | Prompt4:
    """Cut one training row (a dict of a row's columns) before its last assistant turn (a 4.x row: prompts4)."""
    if is_row4(row):
        return prompt4_of(row, has_reference, patch_size)
    ids = np.asarray(row["input_ids"], dtype=np.int64)
    start, end = answer_start(row)
    tgt = np.asarray(row["tgt_sizes"], dtype=np.int32).reshape(-1, 2)
    bounds = np.asarray(row["image_bound"], dtype=np.int64).reshape(-1, 2)
    crops = unpack_pixels(row["pixel_values"], tgt, patch_size) if len(tgt) else []
    keep = int(np.sum(bounds[:, 1] <= start))  # crops are in text order: those of images inside the prompt
    return Prompt(str(row["id"]), ids[:start], crops[:keep], tgt[:keep], bounds[:keep], ids[start:end],
                  has_reference)


def prompt_batch(prompts: list[Prompt], pad_id: int = 0, downsample_mode: Optional[str] = None) -> dict:
    """Left-padded batch (generation appends on the right): input_ids, attention_mask, and per sample its crops,
    tgt_sizes and image_bound shifted by its padding. Positions come from the mask inside generate (0 at the first
    real token, as in training). 4.x prompts: the processor's batch (prompts4.prompt_batch4, the tokenizer's pad
    id, `downsample_mode` for the model: the one the processor used)."""
    if isinstance(prompts[0], Prompt4):
        return prompt_batch4(prompts, downsample_mode)
    width = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    bounds = []
    for i, p in enumerate(prompts):
        pad = width - len(p.input_ids)
        ids[i, pad:] = torch.from_numpy(p.input_ids)
        mask[i, pad:] = 1
        bounds.append(torch.from_numpy(p.image_bound + pad))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": [list(p.pixel_values) for p in prompts],
            "tgt_sizes": [torch.from_numpy(p.tgt_sizes) for p in prompts], "image_bound": bounds}
