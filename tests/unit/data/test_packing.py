"""Token-budget micro-batches and packed rows (data/packing.py) on real preprocessed rows: the budget holds,
every sample is used once per epoch, positions restart per sample, labels never cross a sample boundary, crops
and their image_bound spans follow their sample to its offset in the row.

Run: pytest tests/unit/data/test_packing.py   (seconds)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raytune_minicpmv.data.packing import (budget_micro_batches, collate_packed, first_fit_decreasing,
                                           padded_groups, prefetched)
from raytune_minicpmv.data.records import read_raw_records
from raytune_minicpmv.data.rows import collate_rows, preprocess_records, rows_to_table, table_to_numpy
from raytune_minicpmv.data.sample_data import write_sample_dataset
from raytune_minicpmv.data.templates import ModelSpec, TokenizerInfo
from raytune_minicpmv.models.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def cols(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    tok = TokenizerInfo.load(build_tiny_tokenizer(root / "tok"))
    raws = list(read_raw_records(write_sample_dataset(root / "data")))
    spec = ModelSpec("qwen2", max_slice_nums=2)
    return table_to_numpy(rows_to_table(preprocess_records(raws, spec, tok, 2048), spec.patch_size))


def lengths_of(cols) -> list[int]:
    return [len(x) for x in cols["input_ids"]]


def stream(cols, batch_rows: int):
    """What DataIterator.iter_batches(batch_format="numpy") yields: consecutive column slices."""
    n = len(cols["input_ids"])
    for s in range(0, n, batch_rows):
        yield {k: v[s:s + batch_rows] for k, v in cols.items()}


def test_first_fit_decreasing_respects_the_capacity_and_uses_every_item_once():
    lengths = [700, 650, 120, 90, 300, 1000, 60, 410, 5, 999]
    rows = first_fit_decreasing(lengths, 1024)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 1024 for r in rows)
    assert len(rows) == 5  # sum 4334 / 1024 -> at least 5 rows: FFD finds 5
    with pytest.raises(ValueError, match="exceeds train.max_tokens_per_batch=1024"):
        first_fit_decreasing([1025], 1024)


def test_padded_groups_keep_samples_times_longest_within_the_budget():
    lengths = [100, 900, 120, 110, 450, 460, 30]
    groups = padded_groups(lengths, 1000)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(len(g) * max(lengths[i] for i in g) <= 1000 for g in groups)
    assert groups[:2] == [[1], [5, 4]]  # longest first: similar lengths share a batch


def test_packed_row_positions_restart_labels_stay_inside_and_images_follow(cols):
    idx = [2, 3, 4, 5]  # multi-image, sliced multi-turn, text-only, one image
    part = {k: v[idx] for k, v in cols.items()}
    row = collate_packed(part)
    padded = collate_rows(part)
    lens = [len(x) for x in part["input_ids"]]
    assert row["input_ids"].shape == (1, sum(lens)) and row["seq_lens"].tolist() == lens
    assert row["cu_seq_lens"].tolist() == [0, *np.cumsum(lens).tolist()] and row["max_seq_len"] == max(lens)
    starts = row["cu_seq_lens"][:-1].tolist()
    expected_pos = [p for n in lens for p in range(n)]
    assert row["position_ids"][0].tolist() == expected_pos
    ids, labels = row["input_ids"][0], row["labels"][0]
    for s, n, b in zip(starts, lens, range(len(idx))):
        assert ids[s:s + n].tolist() == padded["input_ids"][b, :n].tolist()
        assert labels[s:s + n].tolist() == padded["labels"][b, :n].tolist()
        assert labels[s + n - 1] == -100  # the last position of a sample never points into the next one
    # every label is the next token of the same sample (pre-shifted labels never cross a boundary)
    sample_of = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    t = torch.nonzero(labels != -100).flatten()
    assert len(t) > 0 and (t + 1 < len(ids)).all()
    assert (labels[t] == ids[t + 1]).all() and (sample_of[t] == sample_of[t + 1]).all()
    # crops in sample order, each span shifted by its sample's offset
    assert [c.shape for c in row["pixel_values"][0]] == [c.shape for cs in padded["pixel_values"] for c in cs]
    want = torch.cat([b + s for b, s in zip(padded["image_bound"], starts)])
    assert torch.equal(row["image_bound"][0], want) and len(want) == sum(len(p) for p in padded["pixel_values"])
    assert torch.equal(row["tgt_sizes"][0], torch.cat(padded["tgt_sizes"]))
    assert int(row["num_images"].sum()) == int(padded["num_images"].sum())


@pytest.mark.parametrize("packing", [True, False])
def test_budget_micro_batches_hold_the_budget_and_train_every_sample_once(cols, packing):
    lengths = lengths_of(cols)
    budget = 2 * max(lengths)
    batches = list(budget_micro_batches(stream(cols, 3), budget, packing, window=8))
    seen = []
    for b in batches:
        assert b["input_ids"].numel() <= budget  # padded tokens (rows x longest) or the packed row's length
        if packing:
            assert b["input_ids"].shape[0] == 1
            seen += b["seq_lens"].tolist()
        else:
            seen += b["attention_mask"].sum(1).tolist()
    assert sorted(seen) == sorted(lengths)  # every sample exactly once (lengths as the fingerprint)
    total_labels = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert total_labels == sum(int((np.asarray(x) != -100).sum()) for x in cols["labels"])
    if packing:
        assert len(batches) < len(lengths) / 1.5  # several samples per row
        again = list(budget_micro_batches(stream(cols, 3), budget, packing, window=8))
        assert [b["seq_lens"].tolist() for b in again] == [b["seq_lens"].tolist() for b in batches]  # resumable


def test_prefetched_passes_items_and_raises_the_producers_error():
    def gen():
        yield 1
        yield 2
        raise RuntimeError("bad row")

    it = prefetched(gen())
    assert [next(it), next(it)] == [1, 2]
    with pytest.raises(RuntimeError, match="bad row"):
        next(it)
