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


def test_a_single_image_without_a_tag_goes_first_as_with_the_tag(tmp_path, info):
    Image.new("RGB", (60, 40), (0, 90, 200)).save(tmp_path / "a.png")
    answer = {"role": "assistant", "content": "Blue."}
    tagged = {"id": "t", "image": "a.png", "conversations": [{"role": "user", "content": "<image>\nWhat?"}, answer]}
    bare = {"id": "b", "image": "a.png", "conversations": [{"role": "user", "content": "What?"}, answer]}
    a, b = preprocess_records4(_raws(tmp_path, [tagged, bare]), info, "minicpmv4_6", 2048)
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels) and a.pixels == b.pixels


def test_a_rows_image_token_count_is_its_placeholders_length(tmp_path, info):
    Image.new("RGB", (900, 500), (0, 90, 200)).save(tmp_path / "a.png")  # sliced: source + a grid
    rec = {"id": "i", "image": "a.png", "conversations": [{"role": "user", "content": "<image>\nWhat?"},
                                                          {"role": "assistant", "content": "Blue."}]}
    (row,) = preprocess_records4(_raws(tmp_path, [rec]), info, "minicpmv4_6", 2048)
    ids = row.input_ids.tolist()
    first = ids.index(info.id_start)
    last = max(i for i, t in enumerate(ids) if t in (info.image_end, info.slice_end))
    assert row.crops_per_image[0] > 1 and row.num_image_tokens == last + 1 - first


def test_a_4x_tombstone_row_is_refused_by_collate(tmp_path, info):
    from raytune_minicpmv.data.rows import table_to_numpy
    from raytune_minicpmv.data.rows4 import collate_rows4, rows_to_table4

    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    recs = [{"id": "ok", "conversations": conv}, {"id": "gone", "image": "missing.png", "conversations": conv}]
    rows = preprocess_records4(_raws(tmp_path, recs), info, "minicpmv4_6", 2048, on_bad_record="skip")
    with pytest.raises(ValueError) as e:
        collate_rows4(table_to_numpy(rows_to_table4(rows)))
    assert str(e.value) == "collate got a skipped (tombstone) row; read preprocessed data with build_dataset()"


def _placeholder(info, pads: int) -> list[int]:
    return [info.image_start] + [info.pad] * pads + [info.image_end]


def test_image_structure_reads_a_placeholder_that_ends_the_sequence_and_names_bad_ones(info):
    from raytune_minicpmv.data.family4 import _image_structure

    sizes = np.array([[4, 8]])  # 32 patches: 2 tokens at 16x
    ids = np.array([7] + _placeholder(info, 2) + [info.newline])  # a cut right after the newline that follows
    spans, crops, bounds = _image_structure(ids, sizes, info)
    assert (spans, crops, bounds.tolist()) == ([(1, 5)], [1], [[2, 4]])
    with pytest.raises(ValueError) as e:
        _image_structure(np.array(_placeholder(info, 1)), sizes, info)
    assert str(e.value) == "crop 0 has 1 pad tokens, its target size 4x8 needs 2"
    with pytest.raises(ValueError) as e:
        _image_structure(np.array(_placeholder(info, 2)), np.array([[4, 8], [4, 8]]), info)
    assert str(e.value) == "the placeholders hold 1 crops but the processor returned 2"


def test_a_cut_exactly_at_the_end_of_an_image_keeps_the_image():
    from types import SimpleNamespace

    from raytune_minicpmv.data.family4 import _truncate

    ids = np.arange(10)
    labels = np.full(10, -100)
    labels[1] = 1  # a trained token before the image
    pixels = np.ones((3, 14, 14 * 32), np.float32)
    out = _truncate(SimpleNamespace(source="d.jsonl", id="r"), ids, labels, None, pixels, np.array([[4, 8]]),
                    np.array([[3, 5]]), [1], [(2, 6)], max_length=6)
    assert (out.input_ids.tolist(), out.crops_per_image, out.image_tokens) == ([0, 1, 2, 3, 4, 5], [1], 4)
    assert out.pixel_values.shape == (3, 14, 14 * 32) and out.target_sizes.tolist() == [[4, 8]]
    cut = _truncate(SimpleNamespace(source="d.jsonl", id="r"), ids, labels, None, pixels, np.array([[4, 8]]),
                    np.array([[3, 5]]), [1], [(2, 6)], max_length=5)  # inside the placeholder: the image goes
    assert (cut.input_ids.tolist(), cut.crops_per_image, cut.image_tokens, cut.pixel_values.shape[2]) == (
        [0, 1], [], 0, 0)


def test_spec4_loads_the_tokenizer_it_is_given(tmp_path):
    from transformers import AutoTokenizer

    from raytune_minicpmv.data.family4 import Spec4

    model = write_processor_files(tmp_path / "m", "minicpmv4_6")
    (model / "config.json").write_text(json.dumps({"model_type": "minicpmv4_6"}))
    tok = AutoTokenizer.from_pretrained(str(model))
    tok.add_tokens(["<my_marker>"])  # a fine-tuned tokenizer kept beside the checkpoint
    tok.save_pretrained(str(tmp_path / "tok"))
    spec = Spec4("minicpmv4_6", str(model))
    own, given = spec.load(), spec.load(str(tmp_path / "tok"))
    assert given.tokenizer.convert_tokens_to_ids("<my_marker>") == len(tok) - 1
    assert "<my_marker>" not in own.tokenizer.get_vocab()
    assert "<my_marker>" not in spec.load(str(model)).tokenizer.get_vocab()
