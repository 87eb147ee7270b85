"""Token-budget micro-batches and sequence packing, in the train worker (pure functions + one generator).

    for batch in budget_micro_batches(shard.iter_batches(batch_size=64, batch_format="numpy"),
                                      budget=8192, packing=True):
        model(batch)      # one row of <= 8192 tokens: several whole samples, positions restarting per sample

`train.max_tokens_per_batch` replaces the fixed `micro_batch_size` by a budget of tokens per micro-batch:

* without packing (`data.packing: false`): a micro-batch is a group of samples whose PADDED size (samples ×
  longest) stays within the budget; the window is sorted by length first, so similar lengths share a batch
  (length bucketing: little padding, and attention keeps SDPA's plain causal kernel over a padded batch);
* with packing: a micro-batch is ONE row of at most `budget` real tokens holding several whole samples back to
  back (no sample is ever split). `position_ids` restart at 0 per sample (the LLM's mask then keeps attention
  inside each sample, models/packing.py), each sample's labels are its own pre-shifted labels (its last position
  is -100, so no label points into the next sample), each crop's `image_bound` is shifted by the sample's offset
  in the row and its pixels follow in sample order, so the model scatters every sample's vision features to its
  own span. The batch also carries `seq_lens`, `cu_seq_lens` (int32 starts, for varlen kernels) and
  `max_seq_len`.

The algorithm: first-fit-decreasing (FFD) over a window of `PACK_WINDOW_ROWS` rows of the stream: sort the
window's samples by length, longest first, and put each into the first row with room, else open a new row. FFD
is within 11/9 of the optimal row count and, on windows of tens of samples, fills rows to a few percent of the
budget; a window bounds the memory (each row carries its crops' pixels, ~4 MB per seed-shaped sample) and keeps
the order close to the stream's shuffle. The least-filled row of a window is carried into the next window (when
under `FULL_ENOUGH` of the budget) instead of being emitted half empty; the end of an epoch flushes everything,
so every sample is trained once per epoch. The result depends only on the stream's order: a resumed run skips
the same micro-batches.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

import numpy as np

from .rows import collate_rows

PACK_WINDOW_ROWS = 64
FULL_ENOUGH = 0.9


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of total length <= capacity (FFD; each row in stream order)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"a sample of {n} tokens exceeds train.max_tokens_per_batch={capacity}")
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return [sorted(r) for r in rows]


def padded_groups(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped so that len(group) × longest <= capacity, by decreasing length (length bucketing)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        if lengths[i] > capacity:
            raise ValueError(f"a sample of {lengths[i]} tokens exceeds train.max_tokens_per_batch={capacity}")
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= capacity:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def collate_packed(batch: dict) -> dict:
    """Rows (numpy columns) -> ONE packed row: the model batch of collate_rows with B = 1, plus seq_lens,
    cu_seq_lens and max_seq_len (see the module docstring)."""
    import torch

    padded = collate_rows(batch)
    lens = padded["attention_mask"].sum(dim=1)
    keep = padded["attention_mask"].bool()
    offsets = torch.cumsum(lens, 0) - lens
    bounds = [b + off for b, off in zip(padded["image_bound"], offsets.tolist())]
    out = {"input_ids": padded["input_ids"][keep][None], "labels": padded["labels"][keep][None],
           "position_ids": padded["position_ids"][keep][None],
           "attention_mask": torch.ones(1, int(lens.sum()), dtype=torch.long),
           "pixel_values": [[c for crops in padded["pixel_values"] for c in crops]],
           "tgt_sizes": [torch.cat(padded["tgt_sizes"])], "image_bound": [torch.cat(bounds)],
           "seq_lens": lens, "cu_seq_lens": torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lens, 0)]).to(
               torch.int32), "max_seq_len": int(lens.max())}
    if "num_images" in padded:
        out["num_images"] = padded["num_images"].sum().reshape(1)
    return out


def budget_micro_batches(numpy_batches: Iterable[dict], budget: int, packing: bool,
                         window: int = PACK_WINDOW_ROWS) -> Iterator[dict]:
    """Micro-batches within `budget` tokens from a stream of numpy row batches (one epoch; see module docstring)."""
    pending: Optional[dict] = None
    for nb in numpy_batches:
        pending = nb if pending is None else _concat(pending, nb)
        if _num_rows(pending) < window:
            continue
        groups = _plan(pending, budget, packing)
        carry: list[int] = []
        if packing and len(groups) > 1:
            fill = [sum(_lengths(pending)[i] for i in g) for g in groups]
            worst = int(np.argmin(fill))
            if fill[worst] < FULL_ENOUGH * budget:
                carry = groups.pop(worst)
        for g in groups:
            yield _collate(_take(pending, g), packing)
        pending = _take(pending, carry) if carry else None
    if pending is not None and _num_rows(pending):
        for g in _plan(pending, budget, packing):
            yield _collate(_take(pending, g), packing)


def prefetched(it: Iterator[dict], depth: int = 2) -> Iterator[dict]:
    """`it` run ahead by up to `depth` items in a daemon thread (the collate overlaps the training step, as
    Ray's iter_torch_batches does for its collate_fn); the producer's exception is raised in the consumer."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in it:
                if not put(item):
                    return  # the consumer stopped early (eval_max_batches): let go of the stream
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)
        else:
            put(done)

    threading.Thread(target=produce, daemon=True, name="pack-collate").start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _plan(cols: dict, budget: int, packing: bool) -> list[list[int]]:
    lengths = _lengths(cols)
    return first_fit_decreasing(lengths, budget) if packing else padded_groups(lengths, budget)


def _collate(cols: dict, packing: bool) -> dict:
    return collate_packed(cols) if packing else collate_rows(cols)


def _lengths(cols: dict) -> list[int]:
    return [len(x) for x in cols["input_ids"]]


def _num_rows(cols: dict) -> int:
    return len(cols["input_ids"])


def _take(cols: dict, idx: list[int]) -> dict:
    """Rows `idx` of every column, as 1-D object arrays (ragged list columns may arrive as 2-D arrays when all
    rows happen to have one length; element by element keeps them rows)."""
    out = {}
    for k, v in cols.items():
        arr = np.empty(len(idx), dtype=object)
        for j, i in enumerate(idx):
            arr[j] = v[i]
        out[k] = arr
    return out


def _concat(a: dict, b: dict) -> dict:
    na, nb = _num_rows(a), _num_rows(b)
    joined = {}
    for k in a:
        arr = np.empty(na + nb, dtype=object)
        for j in range(na):
            arr[j] = a[k][j]
        for j in range(nb):
            arr[na + j] = b[k][j]
        joined[k] = arr
    return joined


__all__ = ["PACK_WINDOW_ROWS", "first_fit_decreasing", "padded_groups", "collate_packed", "budget_micro_batches",
           "prefetched"]
