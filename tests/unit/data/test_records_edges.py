"""data/records.py edges that mutation testing found unpinned (docs/TESTING.md): Parquet image columns of an
unexpected shape are a bad record (not a crash), a JSON-object string may start with whitespace, the split check
looks at the image files by default, and the driver's combined error lists the first 20 records and counts the rest.

Run: pytest tests/unit/data/test_records_edges.py   (seconds)
"""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raytune_minicpmv.data.records import (BadDataError, BadRecord, RawRecord, parse_record, read_raw_records,
                                           validate_records)

CONV = [{"role": "user", "content": "<image_00> What?"}, {"role": "assistant", "content": "A dot."}]


def _parquet(tmp_path, image_column: pa.Array, content: str = "<image_00> What?"):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": ["p"], "image": image_column,
                             "conversations": [[{"role": "user", "content": content},
                                                {"role": "assistant", "content": "A dot."}]]}), path)
    return [parse_record(r) for r in read_raw_records(path)]


def test_a_parquet_image_json_string_may_start_with_whitespace(tmp_path):
    (rec,) = _parquet(tmp_path, pa.array(['\n  {"<image_00>": "a.png"}']))
    assert rec.images == {"<image_00>": str(tmp_path / "a.png")}


@pytest.mark.parametrize("column", [
    pa.array([["a.png"]], pa.list_(pa.string())),  # a list of paths: not (tag, path) pairs
    pa.array([["ab", "cd"]], pa.list_(pa.string())),  # two-character strings are not pairs either
    pa.array([[["<image_00>", "a.png", "x"]]], pa.list_(pa.list_(pa.string()))),  # triples
])
def test_a_parquet_image_list_that_is_not_tag_path_pairs_is_a_bad_record(tmp_path, column):
    with pytest.raises(BadRecord) as info:
        _parquet(tmp_path, column)
    assert info.value.reason == "bad_schema" and info.value.record_id == "'p'"
    assert info.value.detail.startswith("'image' must be a path string")


def test_validate_records_checks_the_image_files_by_default(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"id": "a", "image": {"<image_00>": "gone.png"}, "conversations": CONV}]))
    ((raw, rec, err),) = validate_records(read_raw_records(path))
    assert rec is None and (err.reason, err.record_id) == ("image_missing", "'a'")
    assert f"<image_00> -> {tmp_path / 'gone.png'} does not exist" in err.detail
    ((_, rec, err),) = validate_records(read_raw_records(path), check_files=False)
    assert err is None and rec.images == {"<image_00>": str(tmp_path / "gone.png")}


def test_a_json_file_holding_an_object_names_the_fix(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"id": "a", "conversations": CONV}))
    with pytest.raises(BadRecord) as info:
        list(read_raw_records(path))
    assert (info.value.record_id, info.value.reason) == ("?", "bad_schema")
    assert info.value.detail == ("a .json data file must hold a JSON array of records "
                                 "(use .jsonl for one record per line)")


def _bad(n: int) -> list[BadRecord]:
    return [BadRecord("d.jsonl", f"'r{i}'", "bad_roles", "x") for i in range(n)]


def test_bad_data_error_lists_twenty_records_and_counts_the_rest():
    lines = str(BadDataError(_bad(22))).split("\n")
    assert lines[0] == "22 bad record(s) (set data.on_bad_record=skip to drop them):"
    assert lines[1:21] == [f"  d.jsonl: record 'r{i}': bad_roles: x" for i in range(20)]
    assert lines[21:] == ["  ... and 2 more"]
    assert len(BadDataError(_bad(22)).bad) == 22
    # exactly 20: all listed, no "more" line; 21: one more
    assert str(BadDataError(_bad(20))).split("\n")[1:] == [f"  d.jsonl: record 'r{i}': bad_roles: x" for i in range(20)]
    assert str(BadDataError(_bad(21))).split("\n")[-1] == "  ... and 1 more"
    assert str(BadDataError(_bad(3), limit=2)).split("\n")[1:] == ["  d.jsonl: record 'r0': bad_roles: x",
                                                                  "  d.jsonl: record 'r1': bad_roles: x",
                                                                  "  ... and 1 more"]


def test_a_raw_record_that_failed_to_read_is_bad_under_its_position():
    raw = RawRecord("d.jsonl", 4, "", "line 5 is not valid UTF-8 (byte 0xff at column 1)", "bad_encoding")
    with pytest.raises(BadRecord) as info:
        parse_record(raw)
    assert (info.value.record_id, info.value.reason, info.value.detail) == (
        "#4 (no id)", "bad_encoding", "line 5 is not valid UTF-8 (byte 0xff at column 1)")
