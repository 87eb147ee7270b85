"""data/packing.py's `prefetched` (the collate thread) and the budget boundaries: what mutation testing found
unpinned (docs/TESTING.md). The planner must take the longest samples first, pack (not pad) when packing, emit a row at least 90 %
full and carry a fuller-to-be one, and flush packed. The thread must hand over every item and then stop, run ahead by at most `depth`
items, survive a consumer slower than its put poll, let go of the stream when the consumer stops early, and not
keep the process alive (daemon).

Run: pytest tests/unit/data/test_prefetch_edges.py   (about 3 s)
"""
from __future__ import annotations

import threading
import time

import pytest

import numpy as np

from raytune_minicpmv.data.packing import budget_micro_batches, first_fit_decreasing, padded_groups, prefetched


def _drain(it, timeout: float = 10.0) -> list:
    """list(it) in a helper thread: a consumer that never gets its end marker fails the test instead of hanging."""
    out: list = []
    t = threading.Thread(target=lambda: out.extend(it), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"the consumer still waits after {timeout} s (got {out})"
    return out


class Counting:
    """An iterator over 0..n-1 that records how far it was read."""

    def __init__(self, n: int):
        self.n, self.read = n, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.read >= self.n:
            raise StopIteration
        self.read += 1
        return self.read - 1


def _collate_thread() -> threading.Thread:
    (t,) = [t for t in threading.enumerate() if t.name == "pack-collate"]
    return t


def _settled(read, want: int, timeout: float = 5.0) -> int:
    end = time.monotonic() + timeout
    while read() < want and time.monotonic() < end:
        time.sleep(0.02)
    time.sleep(0.3)  # a producer allowed further would have gone on by now
    return read()


def test_every_item_then_the_end():
    assert _drain(prefetched(iter([{"a": 1}, {"a": 2}, {"a": 3}]))) == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert _drain(prefetched(iter([]))) == []


def test_runs_ahead_by_depth_items_in_a_named_daemon_thread():
    src = Counting(100)
    it = prefetched(src)  # depth 2
    try:
        assert next(it) == 0
        # the consumer holds item 0; the queue holds 1 and 2; the producer waits with 3 in hand
        assert _settled(lambda: src.read, 4) == 4
        assert _collate_thread().daemon  # a worker that exits mid-epoch must not wait for this thread
        assert [next(it), next(it)] == [1, 2]
    finally:
        it.close()
    src = Counting(100)
    it = prefetched(src, depth=5)
    try:
        assert next(it) == 0 and _settled(lambda: src.read, 7) == 7
    finally:
        it.close()


def test_a_consumer_slower_than_the_put_poll_gets_every_item():
    # the producer's put waits 0.5 s at a time (to notice a stop); a full queue for longer must not end the stream
    def slow(it):
        for item in it:
            time.sleep(0.6)
            yield item

    assert _drain(slow(prefetched(iter(range(4)))), timeout=20) == [0, 1, 2, 3]


def test_a_consumer_that_stops_early_lets_go_of_the_stream():
    src = Counting(10_000)
    it = prefetched(src)
    assert next(it) == 0
    thread = _collate_thread()
    it.close()  # what an eval loop's break does (eval_max_batches)
    thread.join(5.0)
    assert not thread.is_alive()
    assert src.read <= 4  # the rest of the stream is never read


def test_a_sample_of_exactly_the_budget_fits():
    assert padded_groups([1000, 10], 1000) == [[0], [1]]
    assert first_fit_decreasing([1000, 10], 1000) == [[0], [1]]
    assert padded_groups([500, 500], 1000) == [[0, 1]]  # 2 x 500 is exactly the budget
    with pytest.raises(ValueError, match="a sample of 1001 tokens exceeds train.max_tokens_per_batch=1000"):
        padded_groups([1001], 1000)


def test_first_fit_goes_longest_first():
    # in stream order 100 and 900 would share a row and 950 open another; longest first, 950 opens row 0, 900 row 1,
    # and 100 fits only beside 900 (1000 exactly)
    assert first_fit_decreasing([100, 900, 950], 1000) == [[2], [0, 1]]


def _text_rows(lengths: list[int]) -> dict:
    """Numpy row columns of text-only samples (what Ray Data hands the collate) with the given lengths."""
    def col(values):
        arr = np.empty(len(values), dtype=object)
        arr[:] = values
        return arr

    ids = [np.arange(1, n + 1, dtype=np.int32) for n in lengths]
    labels = [np.append(x[1:], -100).astype(np.int32) for x in ids]
    return {"input_ids": col(ids), "labels": col(labels), "pixel_values": col([b""] * len(lengths)),
            "tgt_sizes": col([np.zeros(0, np.int32)] * len(lengths)),
            "image_bound": col([np.zeros(0, np.int64)] * len(lengths)), "num_images": col([0] * len(lengths))}


def _packed(batches: list[list[int]], window: int = 2) -> list[list[int]]:
    out = list(budget_micro_batches((_text_rows(b) for b in batches), 1000, packing=True, window=window))
    for b in out:
        n = int(b["seq_lens"].sum())  # a packed row (the flush too): one row, every position attended
        assert b["input_ids"].shape == (1, n) and b["attention_mask"].tolist() == [[1] * n]
    return [b["seq_lens"].tolist() for b in out]


def test_packing_packs_what_padding_could_not_hold():
    # 900 + 100 fit one packed row of 1000; padded they would be 2 x 900. Window 2: planned as a full window;
    # window 64: planned by the end-of-epoch flush
    assert _packed([[900, 100]], window=2) == _packed([[900, 100]], window=64) == [[900, 100]]


def test_the_least_filled_row_is_carried_below_90_percent_and_emitted_from_90():
    # window 2: [1000], [899] -> 899 < 900 is carried and shares a row with the next window's 50
    assert _packed([[899, 1000], [50]]) == [[1000], [899, 50]]
    # 900 is 90 % of the budget: emitted; the last 50 is flushed at the end of the epoch, as a packed row
    assert _packed([[900, 1000], [50]]) == [[1000], [900], [50]]
