"""collate_rows on a batch written out by hand (docs/TESTING.md, "Record checks, collate, load_rgb, 4.x rows"):
every value of the model batch, not only its shapes: the tokens and labels of each row at their place, the padding,
the positions, each crop's pixels, sizes and bounds; and a batch that carries only the model's columns.

Run: pytest tests/unit/data/test_collate_rows.py   (about a second, no Ray, no tokenizer)
"""
import numpy as np
import pytest
import torch

from raytune_minicpmv.data.rows import collate_rows
from raytune_minicpmv.data.slicing import normalize

PATCH = 3 * 14 * 14  # uint8 bytes of one 14x14 patch


def _batch(**extra) -> dict:
    """Two rows as Ray Data hands them (object columns of lists): a 5-token row with two crops, a 3-token text row."""
    crops = np.arange(PATCH * (1 * 2 + 1 * 1), dtype=np.int64).astype(np.uint8)  # a 1x2-patch crop, then 1x1
    cols = {
        "input_ids": [[11, 12, 13, 14, 15], [21, 22, 23]],
        "labels": [[-100, -100, 13, 14, -100], [-100, 22, 23]],
        "pixel_values": [crops.tobytes(), b""],
        "tgt_sizes": [[1, 2, 1, 1], []],
        "image_bound": [[1, 2, 3, 4], []],
    }
    cols.update(extra)
    out = {}
    for name, values in cols.items():  # np.array(list of lists) would make a 2-D array; Ray gives an object column
        col = np.empty(len(values), dtype=object)
        col[:] = values
        out[name] = col
    return out, crops


def test_every_value_of_a_padded_batch_is_at_its_place():
    batch, crops = _batch()
    out = collate_rows(batch)  # only the model's columns: no skip_reason, no num_images, no report columns
    assert set(out) == {"input_ids", "labels", "attention_mask", "position_ids", "pixel_values", "tgt_sizes",
                        "image_bound"}
    assert out["input_ids"].tolist() == [[11, 12, 13, 14, 15], [21, 22, 23, 0, 0]]
    assert out["labels"].tolist() == [[-100, -100, 13, 14, -100], [-100, 22, 23, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    for key in ("input_ids", "labels", "attention_mask", "position_ids"):
        assert out[key].dtype == torch.long, key
    (a, b), empty = out["pixel_values"]
    assert empty == []
    assert torch.equal(a, torch.from_numpy(normalize(crops[:2 * PATCH]).reshape(3, 14, 28)))
    assert torch.equal(b, torch.from_numpy(normalize(crops[2 * PATCH:]).reshape(3, 14, 14)))
    assert [t.tolist() for t in out["tgt_sizes"]] == [[[1, 2], [1, 1]], []]
    assert [t.dtype for t in out["tgt_sizes"]] == [torch.int32, torch.int32]
    assert [t.tolist() for t in out["image_bound"]] == [[[1, 2], [3, 4]], []]
    assert tuple(out["image_bound"][1].shape) == (0, 2) and tuple(out["tgt_sizes"][1].shape) == (0, 2)
    assert [t.dtype for t in out["image_bound"]] == [torch.long, torch.long]


def test_the_longest_row_sets_the_width_wherever_it_is():
    batch, _ = _batch(input_ids=[[1, 2], [3, 4, 5, 6, 7, 8]], labels=[[-100, 2], [-100, 4, 5, 6, 7, 8]])
    out = collate_rows(batch)
    assert out["input_ids"].tolist() == [[1, 2, 0, 0, 0, 0], [3, 4, 5, 6, 7, 8]]
    assert out["labels"].tolist() == [[-100, 2, -100, -100, -100, -100], [-100, 4, 5, 6, 7, 8]]
    assert out["attention_mask"].sum(1).tolist() == [2, 6]


def test_good_rows_with_report_columns_collate_and_count_their_images():
    batch, _ = _batch(skip_reason=["", ""], num_images=[1, 0], id=["a", "b"])
    out = collate_rows(batch)
    assert out["num_images"].tolist() == [1, 0] and out["num_images"].dtype == torch.long
    with pytest.raises(ValueError, match=r"collate got a skipped \(tombstone\) row"):
        collate_rows(_batch(skip_reason=["", "image_missing"])[0])
