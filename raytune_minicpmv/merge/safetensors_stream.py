"""Safetensors checkpoints read and written one tensor at a time, so host memory stays near one tensor.

    ckpt = CheckpointReader("path/to/model")       # model.safetensors or model.safetensors.index.json + shards
    for entry in ckpt.entries: ckpt.get(entry.key)  # one tensor in memory, its file pages unmapped again
    plan = plan_shards([(key, shape, dtype), ...], max_shard_bytes=2e9)
    write_sharded(out_dir, plan, produce=lambda key: tensor)  # shards + model.safetensors.index.json

Why not `safetensors.torch.save_file`: it needs every tensor of a shard in memory at once (a 2 GB shard costs
2 GB of RAM on top of what we read). Here every tensor's shape and dtype is known before any data is read, so each
output file's header is written first and the tensors are streamed after it. Reading reopens the file per tensor
because `safe_open` maps the file and the pages it touched stay resident (counted in RSS) until it is closed.
The file format (8-byte little-endian header length, JSON header with `data_offsets` relative to the data
section, tensors packed back to back) is the public safetensors spec; output loads with `safetensors`/transformers.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPE_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}


@dataclass(frozen=True)
class TensorEntry:
    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class SafetensorsFiles:
    """Tensors of one or more safetensors files, loaded one at a time on request."""

    def __init__(self, files: Iterable[Path]):
        self.entries: list[TensorEntry] = []
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    st_dtype = sl.get_dtype()
                    if st_dtype not in ST_TO_DTYPE:
                        raise ValueError(f"{file}: tensor {key} has dtype {st_dtype}, which the merge does not handle")
                    self.entries.append(TensorEntry(key, Path(file), tuple(sl.get_shape()), ST_TO_DTYPE[st_dtype]))
        self._by_key = {e.key: e for e in self.entries}
        if len(self._by_key) != len(self.entries):
            raise ValueError(f"duplicate tensor names across {list(files)}")

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def keys(self) -> list[str]:
        return [e.key for e in self.entries]

    def entry(self, key: str) -> TensorEntry:
        return self._by_key[key]

    def get(self, key: str) -> torch.Tensor:
        # A fresh open per tensor: closing unmaps the file, so its pages leave our RSS (see module docstring).
        with safe_open(str(self._by_key[key].file), framework="pt") as f:
            return f.get_tensor(key)

    @property
    def largest_file_bytes(self) -> int:
        return max((os.path.getsize(f) for f in {e.file for e in self.entries}), default=0)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


class CheckpointReader(SafetensorsFiles):
    """The weights of a Hugging Face checkpoint directory (single file or index + shards)."""

    def __init__(self, ckpt_dir: str | os.PathLike):
        self.dir = Path(ckpt_dir)
        self.weight_files = checkpoint_weight_files(self.dir)
        super().__init__(self.weight_files)


def checkpoint_weight_files(ckpt_dir: Path) -> list[Path]:
    index = ckpt_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [ckpt_dir / name for name in sorted(set(weight_map.values()))]
    if (ckpt_dir / SINGLE_FILE).is_file():
        return [ckpt_dir / SINGLE_FILE]
    found = sorted(p.name for p in ckpt_dir.glob("*")) if ckpt_dir.is_dir() else "directory missing"
    raise FileNotFoundError(
        f"{ckpt_dir}: no {SINGLE_FILE} or {INDEX_FILE} (found: {found}). The merge reads safetensors checkpoints "
        "only; convert a pytorch_model.bin checkpoint with `transformers` save_pretrained(safe_serialization=True).")


# --------------------------------------------------------------------------------------------------------------
# Writing


@dataclass
class ShardPlan:
    """Which tensors (key, shape, dtype) go to which output file, in order."""

    files: dict[str, list[tuple[str, tuple[int, ...], torch.dtype]]] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for items in self.files.values() for _, s, d in items)


def plan_shards(tensors: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int) -> ShardPlan:
    """Greedy packing in the given order; a tensor larger than the limit gets a shard of its own (as HF does)."""
    groups: list[list] = [[]]
    size = 0
    for key, shape, dtype in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((key, tuple(shape), dtype))
        size += nbytes
    n = len(groups)
    return ShardPlan({f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)})


def write_sharded(out_dir: str | os.PathLike, plan: ShardPlan, produce: Callable[[str], torch.Tensor],
                  metadata: dict[str, str] | None = None) -> Path:
    """Write every planned shard, asking `produce(key)` for one tensor at a time, then the index. Returns it."""
    out_dir = Path(out_dir)
    weight_map = {}
    for filename, items in plan.files.items():
        _write_one_file(out_dir / filename, items, produce, metadata or {"format": "pt"})
        weight_map.update({key: filename for key, _, _ in items})
    index = out_dir / INDEX_FILE
    index.write_text(json.dumps({"metadata": {"total_size": plan.total_bytes}, "weight_map": weight_map}, indent=2))
    return index


def _write_one_file(path: Path, items, produce, metadata: dict[str, str]) -> None:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key, shape, dtype in items:
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": DTYPE_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer pads the header so tensor data stays 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key, shape, dtype in items:
            t = produce(key)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise RuntimeError(f"{key}: produced {tuple(t.shape)} {t.dtype}, planned {tuple(shape)} {dtype}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t
        f.flush()
        os.fsync(f.fileno())
