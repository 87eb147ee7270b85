"""MiniCPM-V 4.6 / 4.7 rows: records -> Arrow rows (ROW_SCHEMA4) -> the processor's batch (no Ray).

    info = Processor4Info(load_processor4(ckpt, downsample_mode="16x"))
    table = rows_to_table4(preprocess_records4(raws, info, family, max_length=2048))
    batch = collate_rows4(table_to_numpy(table))    # == processor(text=..., images=...) padded right, + labels

ROW_SCHEMA4 is the 2.6 ROW_SCHEMA (same column names and meanings, so reports, tombstones and the Parquet reader
work unchanged) plus four columns: `family` ("minicpmv4_6" / "minicpmv4_7": collate dispatches on it),
`pixel_dtype`, `pad_token_id` and `mm_token_type_ids` (what 4.7's processor returns; empty for 4.6). For 4.x
`tgt_sizes` holds the processor's `target_sizes` and `pixel_values` its packed crops `[3, 14, N]` of the row:
stored as uint8 when the image processor's own rescale + normalize of those bytes gives back exactly the processor's
float32 values (checked per row; true for the default 0.5/0.5 normalization), else as float32 bytes.

The batch (collate_rows4): `input_ids`, `attention_mask` ([B, L], right padding with the tokenizer's pad id),
`pixel_values` ([1, 3, 14, ΣN] float32: every crop of every row in row order, as the processor packs a batch) and
`target_sizes` ([n_crops, 2] int32) when the batch has an image (the processor returns neither for text only),
`mm_token_type_ids` ([B, L], 4.7), plus `labels` ([B, L], pre-shifted, -100 outside assistant answers) and
`num_images` ([B], the trainer's images/s). `model_inputs4(batch)` drops the last two: `model(**model_inputs4(b))`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable

import numpy as np
import pyarrow as pa

from .family4 import Processor4Info, check_control_tokens4, encode_record4
from .images import ImageLoadError, load_rgb
from .records import BadRecord, RawRecord, parse_record
from .rows import ROW_SCHEMA, row_columns

log = logging.getLogger(__name__)

ROW_SCHEMA4 = pa.schema(list(ROW_SCHEMA) + [
    pa.field("family", pa.string()),
    pa.field("pixel_dtype", pa.string()),  # "uint8" | "float32"
    pa.field("pad_token_id", pa.int32()),
    pa.field("mm_token_type_ids", pa.list_(pa.int32())),  # 4.7; empty for 4.6
])
NON_MODEL_KEYS4 = ("labels", "num_images")


@dataclass
class Row4:
    id: str
    source: str
    family: str
    pad_token_id: int = 0
    input_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    pixels: bytes = b""
    pixel_dtype: str = "uint8"
    target_sizes: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int32))
    image_bound: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    crops_per_image: list = field(default_factory=list)
    mm_token_type_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    num_image_tokens: int = 0
    skip_reason: str = ""
    skip_detail: str = ""


def preprocess_records4(raws: Iterable[RawRecord], info: Processor4Info, family: str, max_length: int,
                        on_bad_record: str = "error") -> list[Row4]:
    """Raw records -> rows in input order (tombstones for bad records when on_bad_record="skip")."""
    rows = []
    for raw in raws:
        try:
            rows.append(_row(raw, info, family, max_length))
        except BadRecord as e:
            if on_bad_record == "error":
                raise
            log.warning("skipping bad record: %s", e)
            rows.append(Row4(id=str(e.record_id).strip("'"), source=raw.source, family=family,
                             skip_reason=e.reason, skip_detail=e.detail))
    return rows


def _row(raw: RawRecord, info: Processor4Info, family: str, max_length: int) -> Row4:
    rec = parse_record(raw, check_files=False)
    check_control_tokens4(rec, info)
    images = []
    for tag, path in rec.images.items():  # text order: the order of the placeholders
        try:
            images.append(load_rgb(path))
        except ImageLoadError as e:
            reason = "image_missing" if "not found" in str(e) else "image_unreadable"
            raise BadRecord(rec.source, repr(rec.id), reason, f"{tag}: {e}") from None
    enc = encode_record4(rec, images, info, max_length)
    pixels, dtype = encode_pixels(enc.pixel_values)
    return Row4(id=rec.id, source=rec.source, family=family, pad_token_id=info.pad_token_id,
                input_ids=enc.input_ids, labels=enc.labels, pixels=pixels, pixel_dtype=dtype,
                target_sizes=enc.target_sizes, image_bound=enc.image_bound, crops_per_image=enc.crops_per_image,
                mm_token_type_ids=enc.mm_token_type_ids if enc.mm_token_type_ids is not None else np.zeros(
                    0, np.int32), num_image_tokens=enc.image_tokens)


# --------------------------------------------------------------------------------------------------------------
# Pixels: uint8 when that is exact


@lru_cache(maxsize=1)
def _reference_image_processor():
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

    return MiniCPMV4_6ImageProcessorPil()


@lru_cache(maxsize=1)
def _decode_table() -> np.ndarray:
    # rescale and normalize act on each value alone (per channel), so the image processor's own functions applied
    # once to the 256 values of each channel give, by lookup, exactly what they give on a whole image
    ip = _reference_image_processor()
    ramp = np.ascontiguousarray(np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)))
    return np.asarray(ip.normalize(ip.rescale(ramp, ip.rescale_factor), ip.image_mean, ip.image_std),
                      np.float32)[:, 0, :]


def decode_pixels(u8: np.ndarray) -> np.ndarray:
    """uint8 [3, p, N] -> float32 = the image processor's rescale + normalize (default 1/255, 0.5/0.5)."""
    table = _decode_table()
    return np.stack([table[c][u8[c]] for c in range(u8.shape[0])])


def encode_pixels(pixels: np.ndarray) -> tuple[bytes, str]:
    """(bytes, dtype): uint8 when decode_pixels gives `pixels` back bit for bit, else float32."""
    if pixels.size == 0:
        return b"", "uint8"
    ip = _reference_image_processor()
    # the inverse in float32, in place (a third of the row's time in float64); any rounding slip shows in the check
    x = pixels * (np.asarray(ip.image_std, np.float32) / np.float32(ip.rescale_factor)).reshape(-1, 1, 1)
    x += (np.asarray(ip.image_mean, np.float32) / np.float32(ip.rescale_factor)).reshape(-1, 1, 1)
    u8 = np.clip(np.rint(x, out=x), 0, 255, out=x).astype(np.uint8)
    if np.array_equal(decode_pixels(u8), pixels):
        return u8.tobytes(), "uint8"
    return np.ascontiguousarray(pixels, np.float32).tobytes(), "float32"


# --------------------------------------------------------------------------------------------------------------
# Arrow


def rows_to_table4(rows: list[Row4]) -> pa.Table:
    pixels = pa.array([r.pixels for r in rows], pa.large_binary())
    return pa.table({
        **row_columns(rows, pixels, [r.target_sizes for r in rows]),
        "family": pa.array([r.family for r in rows], pa.string()),
        "pixel_dtype": pa.array([r.pixel_dtype for r in rows], pa.string()),
        "pad_token_id": pa.array([r.pad_token_id for r in rows], pa.int32()),
        "mm_token_type_ids": pa.array([r.mm_token_type_ids for r in rows], pa.list_(pa.int32())),
    }, schema=ROW_SCHEMA4)


# --------------------------------------------------------------------------------------------------------------
# Collate (runs in the train workers)


def is_family4_batch(batch: dict) -> bool:
    fam = batch.get("family")
    return fam is not None and len(fam) > 0 and str(fam[0]).startswith("minicpmv4_")


def collate_rows4(batch: dict, patch_size: int = 14) -> dict:
    """Rows (numpy columns) -> the processor's batch for the same conversations (right padding) + labels."""
    import torch

    if any(r for r in batch.get("skip_reason", [])):
        raise ValueError("collate got a skipped (tombstone) row; read preprocessed data with build_dataset()")
    seqs = [np.asarray(x, dtype=np.int64) for x in batch["input_ids"]]
    n, width = len(seqs), max(len(s) for s in seqs)
    pad = int(np.asarray(batch["pad_token_id"])[0])
    input_ids = np.full((n, width), pad, np.int64)
    labels = np.full((n, width), -100, np.int64)
    attention = np.zeros((n, width), np.int64)
    for i, (s, lab) in enumerate(zip(seqs, batch["labels"])):
        input_ids[i, :len(s)], labels[i, :len(s)], attention[i, :len(s)] = s, np.asarray(lab, np.int64), 1
    out = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention)}
    if str(batch["family"][0]) == "minicpmv4_7":
        mm = np.zeros((n, width), np.int64)
        for i, row in enumerate(batch["mm_token_type_ids"]):
            mm[i, :len(row)] = np.asarray(row, np.int64)
        out["mm_token_type_ids"] = torch.from_numpy(mm)
    sizes = [np.asarray(t, dtype=np.int32).reshape(-1, 2) for t in batch["tgt_sizes"]]
    if sum(len(s) for s in sizes):
        packs = [_unpack(raw, dtype, ts, patch_size) for raw, dtype, ts in
                 zip(batch["pixel_values"], batch["pixel_dtype"], sizes) if len(ts)]
        out["pixel_values"] = torch.from_numpy(np.concatenate(packs, axis=-1)[np.newaxis])
        out["target_sizes"] = torch.from_numpy(np.concatenate(sizes, axis=0))
    out["labels"] = torch.from_numpy(labels)
    out["num_images"] = torch.as_tensor(np.asarray(batch["num_images"], dtype=np.int64))
    return out


def model_inputs4(batch: dict) -> dict:
    """The batch without `labels` / `num_images`: what `model(**...)` takes."""
    return {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS4}


def _unpack(raw, dtype: str, ts: np.ndarray, patch_size: int) -> np.ndarray:
    columns = int((ts[:, 0].astype(np.int64) * ts[:, 1]).sum()) * patch_size
    flat = np.frombuffer(raw, dtype=np.uint8 if dtype == "uint8" else np.float32)
    if flat.size != 3 * patch_size * columns:
        raise ValueError(f"pixel buffer holds {flat.size} values but target_sizes describe {3 * patch_size * columns}")
    arr = flat.reshape(3, patch_size, columns)
    return decode_pixels(arr) if dtype == "uint8" else arr.copy()
