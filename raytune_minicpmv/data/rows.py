"""Records -> model rows in batches, and rows -> the model batch (pure functions, no Ray).

    rows = preprocess_records(raw_records, spec, tok, max_length=2048, on_bad_record="skip")   # list[Row]
    table = rows_to_table(rows)                   # pyarrow.Table with ROW_SCHEMA (what Ray Data streams/writes)
    batch = Collate()(table_to_numpy(table))      # the model batch of docs/ARCHITECTURE.md

`pipeline.py` runs `preprocess_records` inside Ray Data's `map_batches`; tests, the merge check and the benchmark
call it directly. One batch: decode every image (EXIF, modes, see images.py), plan its slices (only the size is
needed), render every conversation, tokenize all texts in ONE fast-tokenizer call, then per record compute labels,
bounds and image-aware truncation, and only then resize/crop/pack the images that survived truncation. Crops are
packed straight into one uint8 buffer per batch, which becomes the Arrow column without another copy.

A bad record raises `BadRecord` (on_bad_record="error") or becomes a *tombstone* row: empty tensors, `skip_reason`
and `skip_detail` set, so it is counted in the report and never silently lost (readers filter tombstones out).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa

from .images import ImageLoadError, load_rgb
from .records import BadRecord, RawRecord, parse_record
from .slicing import SlicePlan, normalize, plan_slices, slice_image
from .templates import (ModelSpec, TokenizerInfo, build_messages, check_control_tokens, encode_minicpm, encode_texts,
                        finish, image_placeholder, render_text, trainable_from_offsets)

log = logging.getLogger(__name__)

# One row per record. Ragged tensors are flattened (Arrow-safe, Parquet-safe); shapes come from tgt_sizes.
ROW_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("pixel_values", pa.large_binary()),  # uint8 crops packed [3, 14, N*14], concatenated in crop order
    ("tgt_sizes", pa.list_(pa.int32())),  # flat [n_crops * 2]: (H/14, W/14) per crop
    ("image_bound", pa.list_(pa.int64())),  # flat [n_crops * 2]: [start, end) per crop
    ("num_images", pa.int32()),
    # report columns (not used by the model)
    ("source", pa.string()),
    ("crops_per_image", pa.list_(pa.int32())),
    ("num_tokens", pa.int32()),
    ("num_image_tokens", pa.int32()),
    ("num_trainable", pa.int32()),
    ("skip_reason", pa.string()),  # "" for a good row
    ("skip_detail", pa.string()),
])


@dataclass
class Row:
    id: str
    source: str
    input_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    crops: list = field(default_factory=list)  # PIL RGB crops, packed when the table is built
    tgt_sizes: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int32))
    image_bound: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    crops_per_image: list = field(default_factory=list)
    num_image_tokens: int = 0
    skip_reason: str = ""
    skip_detail: str = ""


@dataclass
class _Work:  # one record on its way through the batch
    raw: RawRecord
    record: object = None
    images: list = field(default_factory=list)
    plans: list = field(default_factory=list)
    text: str = ""
    spans: list = field(default_factory=list)
    ids: Optional[np.ndarray] = None
    trainable: Optional[np.ndarray] = None
    row: Optional[Row] = None


def preprocess_records(raws: Iterable[RawRecord], spec: ModelSpec, tok: TokenizerInfo, max_length: int,
                       on_bad_record: str = "error") -> list[Row]:
    """Raw records -> rows, in the input order (tombstones for bad records when on_bad_record="skip")."""
    work = [_Work(raw) for raw in raws]
    for w in work:
        _guard(w, on_bad_record, lambda: _decode_and_render(w, spec, tok))
    live = [w for w in work if w.row is None and spec.llm_type != "minicpm"]
    for w, (ids, offsets) in zip(live, encode_texts([w.text for w in live], tok) if live else []):
        w.ids, w.trainable = ids, trainable_from_offsets(offsets, w.spans)
    for w in work:
        _guard(w, on_bad_record, lambda: _finish(w, spec, tok, max_length))
    return [w.row for w in work]


def _guard(w: _Work, on_bad_record: str, step) -> None:
    if w.row is not None:
        return
    try:
        step()
    except BadRecord as e:
        if on_bad_record == "error":
            raise
        log.warning("skipping bad record: %s", e)
        w.row = Row(id=str(e.record_id).strip("'"), source=w.raw.source, skip_reason=e.reason, skip_detail=e.detail)


def _decode_and_render(w: _Work, spec: ModelSpec, tok: TokenizerInfo) -> None:
    rec = w.record = parse_record(w.raw, check_files=False)
    check_control_tokens(rec, tok)
    for tag, path in rec.images.items():
        try:
            w.images.append(load_rgb(path))
        except ImageLoadError as e:
            reason = "image_missing" if "not found" in str(e) else "image_unreadable"
            raise BadRecord(rec.source, repr(rec.id), reason, f"{tag}: {e}") from None
    w.plans = [plan_slices(im.size, spec.max_slice_nums, spec.scale_resolution, spec.patch_size) for im in w.images]
    messages = build_messages(rec, [image_placeholder(spec, p.grid, k) for k, p in enumerate(w.plans)])
    if spec.llm_type == "minicpm":  # tokenized segment by segment, as MiniCPM-V 2.0 was trained
        w.ids, w.trainable = encode_minicpm(messages, rec.system, tok)
    else:
        w.text, w.spans = render_text(messages, rec.system, spec, tok)


def _finish(w: _Work, spec: ModelSpec, tok: TokenizerInfo, max_length: int) -> None:
    t = finish(w.record, w.ids, w.trainable, w.plans, spec, tok, max_length)
    plans: list[SlicePlan] = w.plans[:t.kept_images]
    crops = [c for im, p in zip(w.images, plans) for c in slice_image(im, p)]
    tgt = [s for p in plans for s in p.tgt_sizes(spec.patch_size)]
    w.row = Row(id=w.record.id, source=w.record.source, input_ids=t.input_ids, labels=t.labels, crops=crops,
                tgt_sizes=np.asarray(tgt, np.int32).reshape(-1, 2), image_bound=t.image_bound,
                crops_per_image=[p.num_crops for p in plans], num_image_tokens=t.image_tokens)
    w.images = []  # free the decoded originals early


# --------------------------------------------------------------------------------------------------------------
# Arrow


def rows_to_table(rows: list[Row], patch_size: int = 14) -> pa.Table:
    """Build the Arrow table; all crops of the batch are packed into one buffer (zero-copy binary column)."""
    sizes = [sum(3 * c.size[0] * c.size[1] for c in r.crops) for r in rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    buf = np.empty(int(offsets[-1]), dtype=np.uint8)
    pos = 0
    for r in rows:
        for c in r.crops:
            w, h = c.size
            _pack_into(c, buf[pos:pos + 3 * w * h], patch_size)
            pos += 3 * w * h
        r.crops = []
    pixel_values = pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(rows),
                                                    [None, pa.py_buffer(offsets), pa.py_buffer(buf)])
    return pa.table(row_columns(rows, pixel_values, [r.tgt_sizes for r in rows]), schema=ROW_SCHEMA)


def row_columns(rows: list, pixel_values: pa.Array, crop_sizes: list[np.ndarray]) -> dict:
    """The ROW_SCHEMA columns of rows (2.x `Row`s or 4.x `Row4`s: same fields, the crop sizes passed in), in order."""
    return {
        "id": pa.array([r.id for r in rows], pa.string()),
        "input_ids": pa.array([r.input_ids for r in rows], pa.list_(pa.int32())),
        "labels": pa.array([r.labels for r in rows], pa.list_(pa.int32())),
        "pixel_values": pixel_values,
        "tgt_sizes": pa.array([t.reshape(-1) for t in crop_sizes], pa.list_(pa.int32())),
        "image_bound": pa.array([r.image_bound.reshape(-1) for r in rows], pa.list_(pa.int64())),
        "num_images": pa.array([len(r.crops_per_image) for r in rows], pa.int32()),
        "source": pa.array([r.source for r in rows], pa.string()),
        "crops_per_image": pa.array([r.crops_per_image for r in rows], pa.list_(pa.int32())),
        "num_tokens": pa.array([len(r.input_ids) for r in rows], pa.int32()),
        "num_image_tokens": pa.array([r.num_image_tokens for r in rows], pa.int32()),
        "num_trainable": pa.array([int((r.labels != -100).sum()) for r in rows], pa.int32()),
        "skip_reason": pa.array([r.skip_reason for r in rows], pa.string()),
        "skip_detail": pa.array([r.skip_detail for r in rows], pa.string()),
    }


def _pack_into(crop, out: np.ndarray, p: int) -> None:
    # slicing.pack_crop, writing into the batch buffer: out[c, i, (r*Wp+q)*p + j] = pixel[r*p+i, q*p+j, c].
    # Per band (PIL's split gives contiguous HxW planes) the inner copy moves 14 contiguous bytes: ~3x faster than
    # transposing the interleaved HxWx3 array.
    w, h = crop.size
    hp, wp = h // p, w // p
    planes = out.reshape(3, p, hp, wp, p)
    for c, band in enumerate(crop.split()):
        np.copyto(planes[c], np.asarray(band).reshape(hp, p, wp, p).transpose(1, 0, 2, 3))


def table_to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    """What Ray Data hands a NumpyBatchCollateFn: one numpy (object) array per column."""
    return {name: np.array(table.column(name).to_pylist() if pa.types.is_list(table.schema.field(name).type)
                           or pa.types.is_large_binary(table.schema.field(name).type) else
                           table.column(name).to_numpy(), dtype=object) for name in table.column_names}


# --------------------------------------------------------------------------------------------------------------
# Collate (runs in the train workers)


def collate_rows(batch: dict) -> dict:
    """Rows (numpy columns) -> the model batch dict of docs/ARCHITECTURE.md (right padding, labels -100)."""
    import torch

    from .rows4 import collate_rows4, is_family4_batch

    if is_family4_batch(batch):  # 4.6/4.7 rows: the processor's batch (rows4.py)
        return collate_rows4(batch)
    if any(r for r in batch.get("skip_reason", [])):
        raise ValueError("collate got a skipped (tombstone) row; read preprocessed data with build_dataset()")
    seqs = [np.asarray(x, dtype=np.int64) for x in batch["input_ids"]]
    labs = [np.asarray(x, dtype=np.int64) for x in batch["labels"]]
    n, width = len(seqs), max(len(s) for s in seqs)
    input_ids = np.zeros((n, width), np.int64)
    labels = np.full((n, width), -100, np.int64)
    attention = np.zeros((n, width), np.int64)
    # positions run on through the right padding: restarting them at 0 would look like packed samples to
    # transformers, which then builds a [B, 1, L, L] mask instead of using SDPA's causal kernel
    positions = np.tile(np.arange(width, dtype=np.int64), (n, 1))
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        input_ids[i, :len(s)], labels[i, :len(s)], attention[i, :len(s)] = s, lab, 1
    pixel_values, tgt_sizes, bounds = [], [], []
    for raw, tgt, bound in zip(batch["pixel_values"], batch["tgt_sizes"], batch["image_bound"]):
        tgt = np.asarray(tgt, dtype=np.int32).reshape(-1, 2)
        pixel_values.append(unpack_pixels(raw, tgt))
        tgt_sizes.append(torch.tensor(tgt, dtype=torch.int32))
        bounds.append(torch.tensor(np.asarray(bound, dtype=np.int64).reshape(-1, 2)))
    out = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
           "attention_mask": torch.from_numpy(attention), "position_ids": torch.from_numpy(positions),
           "pixel_values": pixel_values, "tgt_sizes": tgt_sizes, "image_bound": bounds}
    if "num_images" in batch:  # images per row (a sliced image has several crops): the trainer's images/s
        out["num_images"] = torch.as_tensor(np.asarray(batch["num_images"], dtype=np.int64))
    return out


def unpack_pixels(raw: bytes, tgt: np.ndarray, patch_size: int = 14) -> list:
    """One row's uint8 buffer -> float32 tensors [3, 14, N*14] in [-1, 1], one per crop."""
    import torch

    flat = np.frombuffer(raw, dtype=np.uint8)
    out, pos = [], 0
    for h, w in tgt:
        size = 3 * patch_size * patch_size * int(h) * int(w)
        out.append(torch.from_numpy(normalize(flat[pos:pos + size]).reshape(3, patch_size, -1)))
        pos += size
    if pos != len(flat):
        raise ValueError(f"pixel buffer holds {len(flat)} bytes but tgt_sizes describe {pos}")
    return out
