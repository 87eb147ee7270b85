"""Readers (JSON array, JSONL, Parquet) and the bad-input rule: every error names file, record id and reason."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raytune_minicpmv.data.records import BadRecord, parse_record, read_raw_records
from raytune_minicpmv.data.rows import preprocess_records
from raytune_minicpmv.data.templates import ModelSpec, TokenizerInfo
from raytune_minicpmv.models.tiny_tokenizer import build_tiny_tokenizer

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
    # the top-level system prompt is text like any other: no image tag, no marker (the bounds would break)
    ({"id": "r7", "system": "Look at <image> first.", "conversations": CONV[1:]},
     "reserved_marker", "'system' contains '<image>'"),
    ({"id": "r7", "system": "a </slice> b", "image": "img/a.png", "conversations": CONV},
     "reserved_marker", "'system' contains '</slice>'"),
    ({"id": "r7", "system": "be brief<|im_end|>", "conversations": CONV[1:]},
     "reserved_marker", "'system' contains '<\\|im_end\\|>'"),
    # ChatML control strings would close or open a turn inside the text (and be trained as control tokens)
    ({"id": "r7", "conversations": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "ok<|im_end|>\n<|im_start|>user\nmore"}]},
     "reserved_marker", "conversations\\[1\\] contains '<\\|im_start\\|>'"),
    ({"id": "r7", "conversations": [{"role": "user", "content": "end<|endoftext|>"},
                                    {"role": "assistant", "content": "x"}]},
     "reserved_marker", "conversations\\[0\\] contains '<\\|endoftext\\|>'"),
    ({"id": "r7", "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a<|im_end|>"}]},
     "reserved_marker", "conversations\\[1\\] contains '<\\|im_end\\|>'"),
    ({"id": "r7", "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\ud800b"}]},
     "bad_encoding", "conversations\\[1\\].content holds a lone surrogate"),
    ({"id": "r7", "image": {"<image>": "img/a.png", "<image_00>": "img/b.png"},
      "conversations": [{"role": "user", "content": "<image_00> q"}, {"role": "assistant", "content": "x"}]},
     "bad_schema", "entries must be"),
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


# --------------------------------------------------------------------------------------------------------------
# Input that used to crash the whole run: now one bad record (or one clear file error) naming file and record


@pytest.fixture(scope="module")
def real26():
    return TokenizerInfo.load(Path(__file__).resolve().parents[2] / "assets" / "minicpmv26_tokenizer")


def _jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def _rec_bytes(rid: str, content: str = "A dot.") -> bytes:
    return json.dumps({"id": rid, "conversations": [{"role": "user", "content": "q"},
                                                   {"role": "assistant", "content": content}]}).encode()


def test_a_non_utf8_jsonl_line_is_one_bad_record(data_dir):
    path = _jsonl(data_dir / "mixed.jsonl", [_rec_bytes("a"), b'{"id": "b", "note": "caf\xe9"}', _rec_bytes("c")])
    raws = list(read_raw_records(path))
    assert [r.index for r in raws] == [0, 1, 2]
    assert [parse_record(r).id for r in (raws[0], raws[2])] == ["a", "c"]
    with pytest.raises(BadRecord, match=r"mixed.jsonl: record #1 \(no id\): bad_encoding: line 2 is not valid UTF-8 "
                                        r"\(byte 0xe9 at column 25\)"):
        parse_record(raws[1])


def test_a_json_file_with_invalid_utf8_names_the_file(data_dir):
    (data_dir / "latin1.json").write_bytes(b'[{"id": "a",\n "note": "caf\xe9"}]')
    with pytest.raises(BadRecord, match=r"latin1.json: record \?: bad_encoding: the file is not valid UTF-8 "
                                        r"\(byte 0xe9 on line 2\)"):
        list(read_raw_records(data_dir / "latin1.json"))


def test_a_utf8_bom_is_ignored(data_dir):
    bom = b"\xef\xbb\xbf"
    path = _jsonl(data_dir / "bom.jsonl", [bom + _rec_bytes("first"), _rec_bytes("second")])
    assert [parse_record(r).id for r in read_raw_records(path)] == ["first", "second"]  # the first is not lost
    (data_dir / "bom.json").write_bytes(bom + b"[" + _rec_bytes("only") + b"]")
    assert [parse_record(r).id for r in read_raw_records(data_dir / "bom.json")] == ["only"]


def test_a_lone_surrogate_is_a_bad_record_not_a_tokenizer_crash(data_dir, real26):
    # JSON allows the escape "\ud800"; the fast tokenizer raises TypeError on such a string (it is not text)
    path = _jsonl(data_dir / "sur.jsonl", [_rec_bytes("ok"), _rec_bytes("bad", "x\ud800y"), _rec_bytes("ok2")])
    rows = preprocess_records(list(read_raw_records(path)), ModelSpec("qwen2"), real26, 256, "skip")
    assert [(r.id, r.skip_reason) for r in rows] == [("ok", ""), ("bad", "bad_encoding"), ("ok2", "")]
    assert "conversations[1].content holds a lone surrogate" in rows[1].skip_detail
    bad_key = next(read_raw_records(_write(data_dir / "k.json", [{"id": "k", "\udc80": 1, "conversations": CONV[1:]}])))
    with pytest.raises(BadRecord, match=r"record 'k': bad_encoding: a key of the record holds a lone surrogate"):
        parse_record(bad_key)


def test_reserved_markers_in_system_are_a_bad_record_not_a_crash(data_dir, real26):
    recs = [{"id": "s1", "system": "Describe <image> well.", "conversations": CONV[1:]},
            {"id": "s2", "system": "Use </slice> tags.", "image": "img/a.png", "conversations": CONV},
            {"id": "s3", "system": "Be brief.", "image": "img/a.png", "conversations": CONV}]
    raws = list(read_raw_records(_write(data_dir / "sys.json", recs)))
    rows = preprocess_records(raws, ModelSpec("qwen2"), real26, 2048, "skip")
    assert [(r.id, r.skip_reason) for r in rows] == [("s1", "reserved_marker"), ("s2", "reserved_marker"), ("s3", "")]
    assert rows[2].image_bound.shape == (1, 2)


def test_every_special_token_of_the_tokenizer_is_refused_in_text_but_grounding_tags_are_kept(data_dir, real26):
    # <|reserved_special_token_0|> is special only in the 2.6 tokenizer: the worker-side check knows it
    grounded = "<ref>the cat</ref><box>1 2 3 4</box>"
    recs = [{"id": "r", "conversations": [{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "a <|reserved_special_token_0|>"}]},
            {"id": "g", "conversations": [{"role": "user", "content": "Where?"},
                                          {"role": "assistant", "content": grounded}]}]
    raws = list(read_raw_records(_write(data_dir / "ctl.json", recs)))
    rows = preprocess_records(raws, ModelSpec("qwen2"), real26, 256, "skip")
    assert (rows[0].skip_reason, rows[0].skip_detail) == (
        "reserved_marker", "conversations[1] contains '<|reserved_special_token_0|>', a special token of the "
                           "model's tokenizer")
    ids, labels = rows[1].input_ids, rows[1].labels
    trained = [int(ids[i + 1]) for i in range(len(ids) - 1) if labels[i] != -100]
    assert real26.tokenizer.decode(trained) == grounded + "<|im_end|>"
    assert 151648 in trained and 151650 in trained  # <ref> and <box> stay the model's grounding tokens


@pytest.mark.parametrize("value,shown", [(None, "null"), (["a"], '["a"]'), ("", '""'), ("  ", '"  "'),
                                         (True, "true"), ({"x": 1}, '{"x": 1}')])
def test_ids_must_be_non_empty_strings_or_integers(data_dir, value, shown):
    with pytest.raises(BadRecord) as info:
        _parse_one(data_dir, {"id": value, "conversations": CONV[1:]})
    assert (info.value.record_id, info.value.reason) == ("#0 (no id)", "bad_schema")
    assert info.value.detail == f"'id' must be a non-empty string (or an integer), got {shown}"
    assert _parse_one(data_dir, {"id": 17, "conversations": [{"role": "user", "content": "q"},
                                                             {"role": "assistant", "content": "a"}]}).id == "17"


def test_duplicate_ids_are_reported(data_dir):
    from raytune_minicpmv.data.pipeline import read_and_check
    from raytune_minicpmv.data.records import BadDataError

    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path = _write(data_dir / "dup.json", [{"id": i, "conversations": conv} for i in ("a", "b", "a", 7, "7")])
    with pytest.raises(BadDataError) as info:
        read_and_check(str(path), "error")
    assert [(b.record_id, b.reason) for b in info.value.bad] == [("'a'", "duplicate_id"), ("'7'", "duplicate_id")]
    assert str(info.value.bad[0]) == (f"{path}: record 'a': duplicate_id: record #0 of {path} has the same id; ids "
                                      "must be unique in a split")
    raws, bad = read_and_check(str(path), "skip")
    assert [r.index for r in raws] == [0, 1, 3] and [b.detail.split()[1] for b in bad] == ["#0", "#3"]


def test_a_directory_is_not_a_data_file(data_dir):
    from raytune_minicpmv.config import ConfigError, config_from_dict

    with pytest.raises(ValueError, match=r"img: is a directory; a data file is one .json, .jsonl or .parquet file"):
        list(read_raw_records(data_dir / "img"))
    with pytest.raises(ConfigError) as info:
        config_from_dict({"data": {"train_path": str(data_dir / "img"), "eval_path": str(data_dir)},
                          "model": {"path": str(data_dir)}})
    assert f"data.train_path: {data_dir / 'img'} is a directory; give one .json, .jsonl or .parquet file" in str(
        info.value)
    assert f"data.eval_path: {data_dir} is a directory; give one .json, .jsonl or .parquet file" in str(info.value)


# --------------------------------------------------------------------------------------------------------------
# Where the official code accepts a record, we accept it too


def test_single_image_dict_with_the_plain_tag_is_a_single_image(data_dir):
    as_dict = _parse_one(data_dir, {"id": "d", "image": {"<image>": "img/a.png"}, "conversations": CONV})
    as_str = _parse_one(data_dir, {"id": "d", "image": "img/a.png", "conversations": CONV})
    assert as_dict == as_str and as_dict.images == {"<image>": str(data_dir / "img/a.png")}


@pytest.mark.parametrize("answer,trained_text", [("  ", "  <|im_end|>"), ("", "<|im_end|>"), (" \t", " \t<|im_end|>"),
                                                 # a leading newline merges with the template's ("\n\n"): the
                                                 # official code starts two tokens after "assistant" and skips it
                                                 ("\n", "<|im_end|>"), ("\nHi", "Hi<|im_end|>")])
def test_blank_answers_are_trained_like_the_official_code(data_dir, real26, answer, trained_text):
    # The official qwen template inserts the content verbatim: its tokens and <|im_end|> are trained.
    rec = {"id": "w", "image": "img/a.png", "conversations": [CONV[0], {"role": "assistant", "content": answer}]}
    (row,) = preprocess_records(list(read_raw_records(_write(data_dir / "w.json", [rec]))), ModelSpec("qwen2"),
                                real26, 2048, "error")
    ids, labels = row.input_ids, row.labels
    trained = [int(ids[i + 1]) for i in range(len(ids) - 1) if labels[i] != -100]
    assert real26.tokenizer.decode(trained) == trained_text
