"""data/rows.py edges that mutation testing found unpinned (docs/TESTING.md): MiniCPM-V 2.0 records go through
the segment-by-segment encoder in `preprocess_records` too, and the table's packed pixel buffer holds the crops'
uint8 bytes (tests that build the table in a module fixture are mapped by mutmut to one test only, so this one
builds its own).

Run: pytest tests/unit/data/test_rows_edges.py   (seconds)
"""
import json

import numpy as np
from PIL import Image

from raytune_minicpmv.data.images import load_rgb
from raytune_minicpmv.data.records import read_raw_records
from raytune_minicpmv.data.rows import preprocess_records, rows_to_table
from raytune_minicpmv.data.slicing import pack_crop, plan_slices, slice_image
from raytune_minicpmv.data.templates import ModelSpec, TokenizerInfo
from raytune_minicpmv.models.tiny_tokenizer import build_tiny_tokenizer


def _records(tmp_path, recs) -> list:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return list(read_raw_records(path))


def test_minicpm_v2_records_are_encoded_segment_by_segment(tmp_path):
    tok = TokenizerInfo.load(build_tiny_tokenizer(tmp_path / "tok", "minicpm"))
    conv = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    (row,) = preprocess_records(_records(tmp_path, [{"id": "m", "conversations": conv}]),
                                ModelSpec("minicpm", use_image_id=False), tok, 256)
    t = tok.tokenizer
    assert row.skip_reason == "" and t.decode(row.input_ids.tolist()) == "<用户>Q1<AI>A1<用户>Q2<AI>A2</s>"
    assert "".join(t.decode([x]) for x in row.labels.tolist() if x != -100) == "A1</s>A2</s>"


def test_the_pixel_column_holds_each_crops_packed_uint8_bytes_in_order(tmp_path):
    tok = TokenizerInfo.load(build_tiny_tokenizer(tmp_path / "tok"))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(tmp_path / "a.png")  # sliced
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(tmp_path / "b.png")  # one crop
    recs = [{"id": "a", "image": "a.png", "conversations": [{"role": "user", "content": "<image> Q"},
                                                          {"role": "assistant", "content": "A."}]},
            {"id": "b", "image": "b.png", "conversations": [{"role": "user", "content": "<image> Q"},
                                                          {"role": "assistant", "content": "B."}]}]
    spec = ModelSpec("qwen2")
    table = rows_to_table(preprocess_records(_records(tmp_path, recs), spec, tok, 4096), spec.patch_size)
    for name, raw in zip(("a.png", "b.png"), table.column("pixel_values").to_pylist()):
        img = load_rgb(str(tmp_path / name))
        crops = slice_image(img, plan_slices(img.size, spec.max_slice_nums))
        want = b"".join(pack_crop(np.asarray(c)).tobytes() for c in crops)
        assert len(crops) >= (3 if name == "a.png" else 1) and raw == want
