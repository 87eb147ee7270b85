"""parse_record's checks, one hostile record at a time, each pinned to its exact reason and message (docs/TESTING.md,
"Record checks, collate, load_rgb, 4.x rows"): wrong roles and shapes, image tags that do not match the images,
lone surrogates in keys, values and nested fields, ids that are no ids; and what a good record becomes (text-order
images, paths resolved against the data file).

Run: pytest tests/unit/data/test_record_checks.py   (about a second, no Ray, no tokenizer)
"""
import json
import os
import pickle

import pytest
from PIL import Image

from raytune_minicpmv.data.records import RESERVED, BadRecord, RawRecord, parse_record

Q, A = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
SURROGATE = ("holds a lone surrogate (a \\uD800-\\uDFFF escape without its pair); it is not valid Unicode text")
ALTERNATE = "(user and assistant must alternate, starting with user)"


def _raw(tmp_path, rec, index=3) -> RawRecord:
    return RawRecord(str(tmp_path / "train.jsonl"), index, json.dumps(rec))


def _bad(tmp_path, rec, check_files=False) -> tuple[str, str, str]:
    with pytest.raises(BadRecord) as info:
        parse_record(_raw(tmp_path, rec), check_files)
    e = info.value
    assert e.file == str(tmp_path / "train.jsonl")
    assert str(e) == f"{e.file}: record {e.record_id}: {e.reason}: {e.detail}"
    return e.record_id, e.reason, e.detail


def _conv(*contents):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]


@pytest.mark.parametrize("rec,label,reason,detail", [
    ([1, 2], "#3 (no id)", "bad_schema", "a record must be a JSON object, got list"),
    ("just text", "#3 (no id)", "bad_schema", "a record must be a JSON object, got str"),
    ({"conversations": [Q, A]}, "#3 (no id)", "bad_schema", "missing 'id'"),
    ({"id": "r", "conversations": "q? a."}, "'r'", "bad_schema",
     "'conversations' must be a list of {role, content} objects"),
    ({"id": "r", "conversations": [Q, ["assistant", "a"]]}, "'r'", "bad_schema",
     "'conversations' must be a list of {role, content} objects"),
    ({"id": "r", "conversations": [Q, A], "system": ["be brief"]}, "'r'", "bad_schema", "'system' must be a string"),
    ({"id": "r", "conversations": []}, "'r'", "bad_roles",
     "need at least one user and one assistant turn, got 0 message(s)"),
    ({"id": "r", "conversations": [A]}, "'r'", "bad_roles",
     "need at least one user and one assistant turn, got 1 message(s)"),
    ({"id": "r", "conversations": [Q, {"role": "assistant"}]}, "'r'", "bad_schema",
     "conversations[1].content must be a string"),
    ({"id": "r", "conversations": [Q, {"role": "assistant", "content": ["a"]}]}, "'r'", "bad_schema",
     "conversations[1].content must be a string"),
    ({"id": "r", "conversations": [{"content": "q"}, A]}, "'r'", "bad_roles",
     f"conversations[0].role is None, expected 'user' {ALTERNATE}"),
    ({"id": "r", "conversations": [A, Q]}, "'r'", "bad_roles",
     f"conversations[0].role is 'assistant', expected 'user' {ALTERNATE}"),
    ({"id": "r", "conversations": [Q, A, A, Q]}, "'r'", "bad_roles",
     f"conversations[2].role is 'assistant', expected 'user' {ALTERNATE}"),
    ({"id": "r", "conversations": [Q, {"role": "Assistant", "content": "a"}]}, "'r'", "bad_roles",
     f"conversations[1].role is 'Assistant', expected 'assistant' {ALTERNATE}"),
    ({"id": "r", "conversations": [Q, A, Q]}, "'r'", "bad_roles",
     "the last message must be from the assistant (nothing would be trained after it)"),
    # the role check runs before the marker check of the same message, and each message is checked in order
    ({"id": "r", "conversations": _conv("q", "a", "q <slice>", "a </image>")}, "'r'", "reserved_marker",
     "conversations[2] contains '<slice>'"),
    ({"id": "r", "conversations": _conv("q", "a <|eot_id|>")}, "'r'", "reserved_marker",
     "conversations[1] contains '<|eot_id|>'"),
    ({"id": "r", "conversations": _conv("q", "see <image>")}, "'r'", "image_tag_later_turn",
     "conversations[1] contains a literal <image>; a single image's tag belongs in the first user message (use "
     "<image_NN> tags for images in later turns)"),
    ({"id": 0, "conversations": [Q]}, "'0'", "bad_roles",  # 0 is an id (a falsy one)
     "need at least one user and one assistant turn, got 1 message(s)"),
    ({"id": False, "conversations": [Q, A]}, "#3 (no id)", "bad_schema",
     "'id' must be a non-empty string (or an integer), got false"),
    ({"id": "\t\n", "conversations": [Q, A]}, "#3 (no id)", "bad_schema",
     "'id' must be a non-empty string (or an integer), got \"\\t\\n\""),
])
def test_a_record_of_the_wrong_shape_is_named_with_its_reason(tmp_path, rec, label, reason, detail):
    assert _bad(tmp_path, rec) == (label, reason, detail)


@pytest.mark.parametrize("marker", RESERVED + ("<image>",))
def test_every_reserved_marker_in_system_is_refused(tmp_path, marker):
    rec = {"id": "r", "conversations": [Q, A], "system": f"be brief {marker}"}
    assert _bad(tmp_path, rec) == ("'r'", "reserved_marker", f"'system' contains {marker!r}")


@pytest.mark.parametrize("marker", RESERVED)
def test_every_reserved_marker_in_a_turn_is_refused(tmp_path, marker):
    assert _bad(tmp_path, {"id": "r", "conversations": _conv("q", f"a {marker} b")}) == (
        "'r'", "reserved_marker", f"conversations[1] contains {marker!r}")


@pytest.mark.parametrize("rec,label,where", [
    ({"id": "r", "conversations": [Q, A], "n\ud800te": 1}, "'r'", "a key of the record"),
    ({"id": "r", "conversations": [Q, {"role": "assistant", "content": "a", "x\udfff": 1}]}, "'r'",
     "a key of conversations[1]"),
    ({"id": "r", "conversations": [Q, A], "system": "s\ud800"}, "'r'", "system"),
    ({"id": "r", "image": {"<image_00>": "a\ud800.png"}, "conversations": _conv("<image_00> q", "a")}, "'r'",
     "image.<image_00>"),
    ({"id": "r", "conversations": [Q, A], "meta": {"tags": ["ok", "b\ud800d"]}}, "'r'", "meta.tags[1]"),
    # the first broken string in file order is the one named
    ({"id": "r", "conversations": [{"role": "user", "content": "\ud801"}, {"role": "assistant", "content": "\ud802"}]},
     "'r'", "conversations[0].content"),
    # an id that is itself broken: the label escapes it, so the message prints anywhere
    ({"id": "r\ud800", "conversations": [Q, A]}, "'r\\ud800'", "id"),
])
def test_a_lone_surrogate_anywhere_names_its_json_path(tmp_path, rec, label, where):
    assert _bad(tmp_path, rec) == (label, "bad_encoding", f"{where} {SURROGATE}")


@pytest.mark.parametrize("image,contents,reason,detail", [
    (None, ("<image> q", "a"), "image_tag_mismatch", "the text has image tags but the record has no 'image'"),
    (None, ("<image_00> q", "a"), "image_tag_mismatch", "the text has image tags but the record has no 'image'"),
    (None, ("q", "a", "look: <image_03>", "a"), "image_tag_mismatch",
     "the text has image tags but the record has no 'image'"),
    ("a.png", ("<image_00> q", "a"), "image_tag_mismatch",
     "tag <image_00> needs an 'image' dict; a single 'image' path goes with <image> (or no tag)"),
    ("a.png", ("<image> q <image>", "a"), "image_tag_mismatch", "<image> appears 2 times for one image"),
    ({"<image>": "a.png"}, ("<image>\n<image> q", "a"), "image_tag_mismatch", "<image> appears 2 times for one image"),
    ({"<image_00>": "a.png"}, ("<image> <image_00> q", "a"), "image_tag_mismatch",
     "literal <image> with an 'image' dict; use its <image_NN> tags"),
    ({"<image_00>": "a.png"}, ("<image> q", "a"), "image_tag_mismatch",
     "literal <image> with an 'image' dict; use its <image_NN> tags"),
    ({"<image_00>": 7}, ("<image_00> q", "a"), "bad_schema",
     "'image' dict entries must be \"<image_NN>\": path, got '<image_00>'"),
    ({"<image_00>": "a.png", "<img_1>": "b.png"}, ("<image_00> q", "a"), "bad_schema",
     "'image' dict entries must be \"<image_NN>\": path, got '<img_1>'"),
    ({"<image_00>x": "a.png"}, ("<image_00> q", "a"), "bad_schema",  # a whole key, not a prefix
     "'image' dict entries must be \"<image_NN>\": path, got '<image_00>x'"),
    ({"<image_00>": "a.png"}, ("<image_00> <image_01> q", "a"), "image_tag_mismatch",
     "tag <image_01> in the text has no entry in 'image'"),
    ({"<image_00>": "a.png", "<image_01>": "b.png", "<image_02>": "b.png"}, ("<image_01> q", "a"),
     "image_tag_mismatch", "'image' entry <image_00> is never referenced in the text"),
    ({"<image_00>": "a.png", "<image_01>": "b.png"}, ("<image_01> <image_00> q <image_01> <image_00>", "a"),
     "image_tag_mismatch", "tag <image_00> appears more than once"),
    ({"<image_00>": "a.png"}, ("<image_00> q", "a", "again <image_00>", "a"), "image_tag_mismatch",
     "tag <image_00> appears more than once"),
    ({}, ("q", "a"), "bad_schema",
     "'image' must be a path string, {\"<image>\": path} or a non-empty {\"<image_NN>\": path} dict"),
    (["a.png"], ("<image> q", "a"), "bad_schema",
     "'image' must be a path string, {\"<image>\": path} or a non-empty {\"<image_NN>\": path} dict"),
    (5, ("q", "a"), "bad_schema",
     "'image' must be a path string, {\"<image>\": path} or a non-empty {\"<image_NN>\": path} dict"),
])
def test_image_tags_that_do_not_match_the_images(tmp_path, image, contents, reason, detail):
    assert _bad(tmp_path, {"id": "r", "image": image, "conversations": _conv(*contents)}) == ("'r'", reason, detail)


def test_missing_image_files_are_named_by_tag_and_resolved_path(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    rec = {"id": "r", "image": {"<image_00>": "a.png", "<image_01>": "sub/../b.png"},
           "conversations": _conv("<image_00><image_01> q", "a")}
    assert _bad(tmp_path, rec, check_files=True) == (
        "'r'", "image_missing", f"<image_01> -> {tmp_path}/sub/../b.png does not exist")  # as the OS reads it
    (tmp_path / "dir.png").mkdir()  # a directory is not an image file
    rec = {"id": "r", "image": "dir.png", "conversations": _conv("<image> q", "a")}
    assert _bad(tmp_path, rec, check_files=True) == (
        "'r'", "image_missing", f"<image> -> {tmp_path / 'dir.png'} does not exist")
    # without the file check the same record parses, with the resolved paths
    assert parse_record(_raw(tmp_path, rec), check_files=False).images == {"<image>": str(tmp_path / "dir.png")}


def test_a_good_record_keeps_its_fields_and_orders_images_as_the_text_does(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "sub" / "b.png")
    conv = _conv("<image_01> then <image_00>?", "b, a", "and?", "done")
    rec = {"id": 42, "image": {"<image_00>": str(tmp_path / "a.png"), "<image_01>": "./sub/b.png"},
           "conversations": conv, "system": "Be brief.", "extra": "ignored"}
    out = parse_record(_raw(tmp_path, rec))
    assert out.id == "42" and out.source == str(tmp_path / "train.jsonl") and out.system == "Be brief."
    assert list(out.images.items()) == [("<image_01>", f"{tmp_path}/./sub/b.png"),
                                        ("<image_00>", str(tmp_path / "a.png"))]
    assert out.conversations == conv
    # no image, no tags: no images, and no system prompt unless the record has one
    plain = parse_record(_raw(tmp_path, {"id": "p", "conversations": [Q, A]}))
    assert (plain.images, plain.system) == ({}, None)
    # an empty system prompt is a system prompt (it has no marker in it)
    assert parse_record(_raw(tmp_path, {"id": "p", "conversations": [Q, A], "system": ""})).system == ""


def test_a_single_image_path_is_resolved_against_the_data_file(tmp_path):
    (tmp_path / "data").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    raw = RawRecord(str(tmp_path / "data" / "train.json"), 0,
                    json.dumps({"id": "s", "image": "../a.png", "conversations": _conv("<image>\nq", "a")}))
    assert parse_record(raw).images == {"<image>": f"{tmp_path}/data/../a.png"}
    raw = RawRecord(os.path.relpath(tmp_path / "data" / "train.json"), 0,  # a relative data path works too
                    json.dumps({"id": "s", "image": "../a.png", "conversations": _conv("q", "a")}))
    assert parse_record(raw).images == {"<image>": f"{tmp_path}/data/../a.png"}


def test_image_paths_through_a_symlinked_folder_mean_what_the_file_system_says(tmp_path):
    # A data folder that is a link into a dataset (common on clusters): "../images/a.png" next to the real
    # annotations is the dataset's image. Folding the ".." away by text (os.path.normpath) pointed it at a sibling
    # of the link instead: a missing file, or silently another image of the same name.
    (tmp_path / "dataset" / "annotations").mkdir(parents=True)
    (tmp_path / "dataset" / "images").mkdir()
    Image.new("RGB", (4, 4), (0, 200, 0)).save(tmp_path / "dataset" / "images" / "a.png")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "data").symlink_to(tmp_path / "dataset" / "annotations", target_is_directory=True)
    (tmp_path / "project" / "images").mkdir()
    Image.new("RGB", (4, 4), (200, 0, 0)).save(tmp_path / "project" / "images" / "a.png")  # the wrong one
    source = tmp_path / "project" / "data" / "train.jsonl"
    for image in ("../images/a.png", str(tmp_path / "project" / "data" / ".." / "images" / "a.png")):
        raw = RawRecord(str(source), 0, json.dumps({"id": "s", "image": image, "conversations": _conv("<image>q", "a")}))
        (path,) = parse_record(raw).images.values()
        assert os.path.samefile(path, tmp_path / "dataset" / "images" / "a.png"), (image, path)
        with Image.open(path) as im:
            assert im.getpixel((0, 0)) == (0, 200, 0)
    (tmp_path / "dataset" / "images" / "a.png").unlink()
    raw = RawRecord(str(source), 0, json.dumps({"id": "s", "image": "../images/a.png", "conversations": _conv("q", "a")}))
    assert _bad(tmp_path / "project" / "data", json.loads(raw.text), check_files=True) == (
        "'s'", "image_missing", f"<image> -> {tmp_path / 'project' / 'data' / '..' / 'images' / 'a.png'} does not exist")


def test_a_bad_record_survives_pickling_with_its_fields(tmp_path):
    e = pickle.loads(pickle.dumps(BadRecord("f.jsonl", "'r'", "bad_roles", "the detail")))
    assert (e.file, e.record_id, e.reason, e.detail) == ("f.jsonl", "'r'", "bad_roles", "the detail")
    assert str(e) == "f.jsonl: record 'r': bad_roles: the detail"
    with pytest.raises(AssertionError):
        BadRecord("f.jsonl", "'r'", "not_a_reason", "x")
