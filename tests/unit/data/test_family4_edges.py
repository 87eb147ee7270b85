"""MiniCPM-V 4.6/4.7 rows: edges that mutation testing found unpinned (docs/TESTING.md, "Record checks, collate,
load_rgb, 4.x rows"): a missing or unreadable image and a record whose answer is cut away are bad records with
their reason (not a crash), pixels are stored as uint8 exactly when that is lossless, and the trained span of an
answer written as content parts. Each test calls the function itself (mutmut maps a function to the tests that
call it first; test_family4.py shares its rows between tests).

Run: pytest tests/unit/data/test_family4_edges.py   (seconds, no Ray)
"""
import json

import numpy as np
import pytest
from PIL import Image

from raytune_minicpmv.data.family4 import END, Processor4Info, assistant_spans
from raytune_minicpmv.data.records import BadRecord, RawRecord
from raytune_minicpmv.data.rows4 import decode_pixels, encode_pixels, preprocess_records4
from raytune_minicpmv.models.processor4 import load_processor4
from raytune_minicpmv.models.tiny_processor4 import write_processor_files


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    d = write_processor_files(tmp_path_factory.mktemp("p46") / "m", "minicpmv4_6")
    (d / "config.json").write_text(json.dumps({"model_type": "minicpmv4_6"}))
    return Processor4Info(load_processor4(d))


def _raws(tmp_path, records):
    return [RawRecord(str(tmp_path / "train.jsonl"), i, json.dumps(r)) for i, r in enumerate(records)]


def test_a_missing_or_unreadable_image_is_a_bad_record_with_its_reason(tmp_path, info):
    (tmp_path / "notes.png").write_text("this is not an image")
    conv = [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A dot."}]
    recs = [{"id": "gone", "image": "missing.png", "conversations": conv},
            {"id": "text", "image": "notes.png", "conversations": conv}]
    rows = preprocess_records4(_raws(tmp_path, recs), info, "minicpmv4_6", 2048, on_bad_record="skip")
    assert [(r.id, r.skip_reason) for r in rows] == [("gone", "image_missing"), ("text", "image_unreadable")]
    assert rows[0].skip_detail == f"<image>: image file not found: {tmp_path / 'missing.png'}"
    assert rows[1].skip_detail == f"<image>: not an image (PIL cannot identify it): {tmp_path / 'notes.png'}"
    with pytest.raises(BadRecord) as e:
        preprocess_records4(_raws(tmp_path, recs[:1]), info, "minicpmv4_6", 2048)
    assert (e.value.file, e.value.record_id, e.value.reason) == (str(tmp_path / "train.jsonl"), "'gone'",
                                                                 "image_missing")


def test_an_answer_cut_away_by_the_length_limit_is_a_bad_record(tmp_path, info):
    rec = {"id": "long", "conversations": [{"role": "user", "content": "word " * 300},
                                           {"role": "assistant", "content": "ok"}]}
    with pytest.raises(BadRecord) as e:
        preprocess_records4(_raws(tmp_path, [rec]), info, "minicpmv4_6", 64)
    assert (e.value.file, e.value.record_id, e.value.reason, e.value.detail) == (
        str(tmp_path / "train.jsonl"), "'long'", "no_trainable_tokens",
        "no assistant token within the first 64 tokens (data.model_max_length)")


def test_pixels_are_stored_as_uint8_exactly_when_that_is_lossless():
    u8 = np.random.RandomState(0).randint(0, 256, (3, 14, 28)).astype(np.uint8)
    pixels = decode_pixels(u8)  # what the image processor makes of 8-bit pixels
    assert encode_pixels(pixels) == (u8.tobytes(), "uint8")
    off = pixels.copy()
    off[1, 2, 3] += np.float32(1e-3)  # a value no uint8 decodes to: stored as float32, bit for bit
    data, dtype = encode_pixels(off)
    assert dtype == "float32" and np.array_equal(np.frombuffer(data, np.float32).reshape(off.shape), off)
    assert encode_pixels(np.zeros((3, 14, 0), np.float32)) == (b"", "uint8")


def test_an_answer_written_as_content_parts_is_trained_as_its_text():
    text = ("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nA dot.<|im_end|>\n")
    msgs = [{"role": "user", "content": [{"type": "text", "text": "q"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A dot."}]}]
    (span,) = assistant_spans(text, msgs)
    assert text[span[0]:span[1]] == "A dot." + END


def test_a_template_without_chatml_assistant_turns_is_refused():
    with pytest.raises(ValueError, match=r"this is not a MiniCPM-V 4.6/4.7 template"):
        assistant_spans("User: q\nAssistant: A dot.", [{"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": "A dot."}])
