"""Readers (JSON array, JSONL, Parquet) and the bad-input rule: every error names file, record id and reason."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raytune_minicpmv.records import BadRecord, parse_record, read_raw_records
from raytune_minicpmv.rows import preprocess_records
from raytune_minicpmv.templates import ModelSpec, TokenizerInfo
from raytune_minicpmv.tiny_tokenizer import build_tiny_tokenizer

CONV = [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A dot."}]


@pytest.fixture()
def data_dir(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "img" / "a.png")
    Image.new("RGB", (64, 48), (10, 10, 200)).save(tmp_path / "img" / "b.png")
    (tmp_path / "img" / "notes.png").write_text("this is not an image")
    (tmp_path / "img" / "broken.png").write_bytes((tmp_path / "img" / "a.png").read_bytes()[:60])
    return tmp_path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return TokenizerInfo.load(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def _write(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def _parse_one(data_dir, rec, name="train.json"):
    raw = next(read_raw_records(_write(data_dir / name, [rec])))
    return parse_record(raw)


def test_three_formats_read_the_same_records(data_dir):
    recs = [{"id": "a", "image": "img/a.png", "conversations": CONV},
            {"id": "b", "conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"id": "c", "image": {"<image_00>": str(data_dir / "img/a.png"), "<image_01>": "img/b.png"},
             "conversations": [{"role": "user", "content": "<image_00><image_01> Compare"},
                               {"role": "assistant", "content": "Same."}], "system": "Be brief."}]
    _write(data_dir / "d.json", recs)
    (data_dir / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    # one Parquet column has one type: a multi-image dict is stored as a JSON object string
    pq.write_table(pa.Table.from_pylist([{"system": None, **r, "image": r["image"] if isinstance(r.get("image"), str) else
                                          json.dumps(r["image"]) if "image" in r else None} for r in recs]),
                   data_dir / "d.parquet")
    parsed = {}
    for ext in ("json", "jsonl", "parquet"):
        parsed[ext] = [parse_record(r) for r in read_raw_records(data_dir / f"d.{ext}")]
    assert [r.id for r in parsed["json"]] == [r.id for r in parsed["jsonl"]] == ["a", "b", "c"]
    key = [(r.id, r.images, r.conversations, r.system) for r in parsed["json"]]
    assert key == [(r.id, r.images, r.conversations, r.system) for r in parsed["jsonl"]]
    assert parsed["json"][0].images == {"<image>": str(data_dir / "img/a.png")}  # relative to the data file
    assert parsed["json"][2].system == "Be brief." and parsed["json"][2].images["<image_01>"] == str(
        data_dir / "img/b.png")
    assert [(r.id, r.images, r.conversations, r.system) for r in parsed["parquet"]] == key
    pq.write_table(pa.table({"id": ["m"], "image": pa.array([[("<image_00>", "img/a.png")]],
                                                          pa.map_(pa.string(), pa.string())),
                             "conversations": [[{"role": "user", "content": "<image_00>"},
                                                {"role": "assistant", "content": "x"}]]}), data_dir / "m.parquet")
    (m,) = [parse_record(r) for r in read_raw_records(data_dir / "m.parquet")]
    assert m.images == {"<image_00>": str(data_dir / "img/a.png")}


@pytest.mark.parametrize("rec,reason,detail", [
    ({"id": "r7", "image": "img/a.png"}, "bad_schema", "missing 'conversations'"),
    ({"id": "r7", "conversations": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "bad_roles", "conversations\\[0\\].role is 'human'"),
    ({"id": "r7", "conversations": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "bad_roles", "must alternate"),
    ({"id": "r7", "conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                    {"role": "user", "content": "c"}]}, "bad_roles", "last message"),
    ({"id": "r7", "conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]},
     "empty_content", "is empty"),
    ({"id": "r7", "image": "img/missing.png", "conversations": CONV}, "image_missing", "does not exist"),
    ({"id": "r7", "image": {"<image_00>": "img/a.png"},
      "conversations": [{"role": "user", "content": "<image_00> <image_01>"}, {"role": "assistant", "content": "x"}]},
     "image_tag_mismatch", "<image_01> in the text has no entry"),
    ({"id": "r7", "image": {"<image_00>": "img/a.png", "<image_01>": "img/b.png"},
      "conversations": [{"role": "user", "content": "<image_00>"}, {"role": "assistant", "content": "x"}]},
     "image_tag_mismatch", "<image_01> is never referenced"),
    ({"id": "r7", "image": "img/a.png", "conversations": CONV + [{"role": "user", "content": "and <image>?"},
                                                                 {"role": "assistant", "content": "x"}]},
     "image_tag_later_turn", "conversations\\[2\\] contains a literal <image>"),
    ({"id": "r7", "conversations": [{"role": "user", "content": "a <slice> b"}, {"role": "assistant", "content": "x"}]},
     "reserved_marker", "<slice>"),
    ({"id": "r7", "conversations": [{"role": "user", "content": "<image> a"}, {"role": "assistant", "content": "x"}]},
     "image_tag_mismatch", "no 'image'"),
])
def test_bad_records_name_file_id_reason(data_dir, rec, reason, detail):
    with pytest.raises(BadRecord) as info:
        _parse_one(data_dir, rec)
    e = info.value
    assert (e.file, e.record_id, e.reason) == (str(data_dir / "train.json"), "'r7'", reason)
    assert str(e).startswith(f"{data_dir / 'train.json'}: record 'r7': {reason}: ")
    import re
    assert re.search(detail, str(e)), str(e)


def test_malformed_json(data_dir):
    (data_dir / "bad.json").write_text('[{"id": "a", "conversations": [}]')
    with pytest.raises(BadRecord, match=r"bad.json: record \?: malformed_json: the file is not valid JSON"):
        list(read_raw_records(data_dir / "bad.json"))
    good = json.dumps({"id": "a", "conversations": CONV[1:]})
    (data_dir / "bad.jsonl").write_text(good + "\n{\"id\": \"b\", oops\n")
    raws = list(read_raw_records(data_dir / "bad.jsonl"))
    with pytest.raises(BadRecord, match=r"bad.jsonl: record #1 \(no id\): malformed_json: line 2 is not valid JSON"):
        parse_record(raws[1])


def _run(data_dir, tok, recs, on_bad="error", max_length=2048):
    raws = list(read_raw_records(_write(data_dir / "train.json", recs)))
    return preprocess_records(raws, ModelSpec("qwen2", max_slice_nums=9), tok, max_length, on_bad)


@pytest.mark.parametrize("image,reason,detail", [("img/notes.png", "image_unreadable", "not an image"),
                                                 ("img/broken.png", "image_unreadable", "cannot decode")])
def test_unreadable_images(data_dir, tok, image, reason, detail):
    with pytest.raises(BadRecord, match=f"train.json: record 'r9': {reason}: <image>: .*{detail}"):
        _run(data_dir, tok, [{"id": "r9", "image": image, "conversations": CONV}])


def test_too_long_and_no_trainable_tokens(data_dir, tok):
    big = data_dir / "img" / "big.png"
    Image.new("RGB", (1344, 1344), (0, 0, 0)).save(big)
    with pytest.raises(BadRecord, match=r"record 'r1': image_tokens_too_long"):
        _run(data_dir, tok, [{"id": "r1", "image": str(big), "conversations": CONV}], max_length=600)
    long_question = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "x"}]
    with pytest.raises(BadRecord, match=r"record 'r2': no_trainable_tokens"):
        _run(data_dir, tok, [{"id": "r2", "conversations": long_question}], max_length=128)


def test_skip_mode_keeps_a_tombstone_per_bad_record(data_dir, tok):
    recs = [{"id": "ok", "image": "img/a.png", "conversations": CONV},
            {"id": "bad1", "image": "img/notes.png", "conversations": CONV},
            {"id": "bad2", "conversations": [{"role": "user", "content": "w " * 300},
                                             {"role": "assistant", "content": "x"}]}]
    rows = _run(data_dir, tok, recs, on_bad="skip", max_length=128)
    assert [(r.id, r.skip_reason) for r in rows] == [("ok", ""), ("bad1", "image_unreadable"),
                                                     ("bad2", "no_trainable_tokens")]
    assert len(rows[0].input_ids) > 0 and len(rows[1].input_ids) == 0 and rows[1].crops == []
