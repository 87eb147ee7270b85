"""rows -> Arrow -> collate: the model batch of docs/ARCHITECTURE.md (shapes, padding, per-sample lists)."""
import json

import numpy as np
import pytest
import torch

from raytune_minicpmv.data.pipeline import Collate
from raytune_minicpmv.data.records import read_raw_records
from raytune_minicpmv.data.rows import ROW_SCHEMA, preprocess_records, rows_to_table, table_to_numpy
from raytune_minicpmv.data.sample_data import write_sample_dataset
from raytune_minicpmv.data.slicing import normalize, pack_crop, plan_slices, slice_image
from raytune_minicpmv.data.images import load_rgb
from raytune_minicpmv.data.templates import ModelSpec, TokenizerInfo
from raytune_minicpmv.models.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def rows_table(tmp_path_factory):
    root = tmp_path_factory.mktemp("c")
    tok = TokenizerInfo.load(build_tiny_tokenizer(root / "tok"))
    raws = list(read_raw_records(write_sample_dataset(root / "data")))
    spec = ModelSpec("qwen2", max_slice_nums=9)
    return raws, rows_to_table(preprocess_records(raws, spec, tok, 2048), spec.patch_size)


def test_table_schema_and_batch(rows_table):
    raws, table = rows_table
    assert table.schema == ROW_SCHEMA and table.num_rows == 20
    idx = [2, 3, 4]  # multi-image, sliced multi-turn, text-only
    batch = Collate()(table_to_numpy(table.take(idx)))
    lengths = [table.column("num_tokens")[i].as_py() for i in idx]
    L = max(lengths)
    for key in ("input_ids", "labels", "attention_mask", "position_ids"):
        assert batch[key].shape == (3, L) and batch[key].dtype == torch.long
    for b, n in enumerate(lengths):
        assert batch["attention_mask"][b].sum() == n
        assert (batch["input_ids"][b, n:] == 0).all() and (batch["labels"][b, n:] == -100).all()
        assert batch["position_ids"][b].tolist() == list(range(L))  # on through the padding (see below)
    assert [len(p) for p in batch["pixel_values"]] == [2, 3, 0]  # per sample, per crop; text-only: empty
    assert [tuple(t.shape) for t in batch["tgt_sizes"]] == [(2, 2), (3, 2), (0, 2)]
    assert batch["tgt_sizes"][0].dtype == torch.int32 and batch["image_bound"][0].dtype == torch.long
    for pv, tgt, bound in zip(batch["pixel_values"], batch["tgt_sizes"], batch["image_bound"]):
        assert len(bound) == len(tgt) == len(pv)
        for crop, (h, w) in zip(pv, tgt.tolist()):
            assert crop.shape == (3, 14, h * w * 14) and crop.dtype == torch.float32


def test_pixels_equal_direct_slicing(rows_table):
    raws, table = rows_table
    batch = Collate()(table_to_numpy(table.take([3])))
    from raytune_minicpmv.data.records import parse_record
    rec = parse_record(raws[3])
    img = load_rgb(next(iter(rec.images.values())))
    crops = slice_image(img, plan_slices(img.size, 9))
    assert len(crops) == len(batch["pixel_values"][0])
    for got, crop in zip(batch["pixel_values"][0], crops):
        assert torch.equal(got, torch.from_numpy(normalize(pack_crop(np.asarray(crop)))))


def test_padded_batch_keeps_sdpas_causal_kernel(rows_table):
    """Issue 12: pad positions that restart at 0 look like packed samples to transformers
    (`find_packed_sequence_indices`), which then builds a [B, 1, L, L] mask for every layer instead of SDPA's
    causal kernel. Positions continue through the right padding; real tokens never attend to it (causal)."""
    from transformers import Qwen2Config
    from transformers.masking_utils import create_causal_mask

    _, table = rows_table
    batch = Collate()(table_to_numpy(table.take([2, 3, 4])))
    config = Qwen2Config(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)
    config._attn_implementation = "sdpa"
    emb = torch.zeros(*batch["input_ids"].shape, 64)
    assert create_causal_mask(config, emb, None, None, batch["position_ids"]) is None


def _report_rows(tmp_path):
    from PIL import Image

    tok = TokenizerInfo.load(build_tiny_tokenizer(tmp_path / "tok"))
    Image.new("RGB", (1024, 768), (200, 10, 10)).save(tmp_path / "a.png")  # 2x2 grid: 5 crops of 518x392
    Image.new("RGB", (100, 100), (10, 10, 200)).save(tmp_path / "b.png")  # upscaled to one 448x448 crop
    conv = [{"role": "user", "content": "Compare."}, {"role": "assistant", "content": "Same."}]
    recs = [{"id": "two", "image": {"<image_00>": "a.png", "<image_01>": "b.png"},
             "conversations": [{"role": "user", "content": "<image_00> <image_01> Compare."}, conv[1]]},
            {"id": "bad", "image": "missing.png", "conversations": conv},
            {"id": "text", "conversations": conv}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    spec = ModelSpec("qwen2")
    return tok, spec, path, preprocess_records(list(read_raw_records(path)), spec, tok, 4096, "skip")


def test_report_columns_describe_each_row_and_tombstones_keep_their_reason(tmp_path):
    from raytune_minicpmv.data.templates import image_placeholder

    tok, spec, path, rows = _report_rows(tmp_path)
    table = rows_to_table(rows)
    col = lambda name: table.column(name).to_pylist()  # noqa: E731
    count = lambda text: len(tok.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert col("id") == ["two", "bad", "text"] and col("source") == [str(path)] * 3
    assert col("skip_reason") == ["", "image_missing", ""] and col("skip_detail")[0] == col("skip_detail")[2] == ""
    assert "<image>: image file not found" in col("skip_detail")[1] and "missing.png" in col("skip_detail")[1]
    assert col("num_images") == [2, 0, 0] and col("crops_per_image") == [[5, 1], [], []]
    assert col("tgt_sizes") == [[28, 37] * 5 + [32, 32], [], []]
    assert [len(b) for b in col("image_bound")] == [12, 0, 0]
    assert col("num_tokens") == [len(r.input_ids) for r in rows] and col("num_tokens")[1] == 0
    placeholders = [image_placeholder(spec, (2, 2), 0), image_placeholder(spec, None, 1)]
    assert col("num_image_tokens") == [count(placeholders[0]) + count(placeholders[1]), 0, 0]
    assert col("num_trainable") == [count("Same.") + 1, 0, count("Same.") + 1]  # the answer + <|im_end|>
    crop_bytes = 3 * (5 * 518 * 392 + 448 * 448)  # uint8 crops, packed back to back
    assert [len(p) for p in col("pixel_values")] == [crop_bytes, 0, 0]


def test_collate_counts_images_refuses_tombstones_and_checks_the_pixel_buffer(tmp_path):
    from raytune_minicpmv.data.rows import collate_rows, unpack_pixels

    _, _, _, rows = _report_rows(tmp_path)
    numpy = table_to_numpy(rows_to_table(rows))
    with pytest.raises(ValueError, match=r"collate got a skipped \(tombstone\) row; read preprocessed data with "
                                         r"build_dataset\(\)"):
        collate_rows(numpy)
    good = {k: v[[0, 2]] for k, v in numpy.items()}
    batch = collate_rows(good)
    assert batch["num_images"].tolist() == [2, 0] and batch["num_images"].dtype == torch.long
    assert [tuple(t.shape) for t in batch["image_bound"][0:1]] == [(6, 2)]
    assert "num_images" not in collate_rows({k: v for k, v in good.items() if k != "num_images"})
    one_patch = np.arange(3 * 14 * 14, dtype=np.uint8)
    (crop,) = unpack_pixels(one_patch.tobytes(), np.array([[1, 1]]))
    assert torch.equal(crop, torch.from_numpy(normalize(one_patch).reshape(3, 14, 14)))
    with pytest.raises(ValueError, match=r"pixel buffer holds 600 bytes but tgt_sizes describe 588"):
        unpack_pixels(bytes(600), np.array([[1, 1]]))
