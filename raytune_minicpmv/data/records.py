"""Records in the MiniCPM-V fine-tune format: reading (JSON array, JSONL, Parquet) and validation (no Ray).

    from raytune_minicpmv.data.records import read_raw_records, parse_record, BadRecord
    for raw in read_raw_records("data/train.jsonl"):        # RawRecord(source, index, text)
        rec = parse_record(raw)                             # Record, or raises BadRecord(file, id, reason, detail)

A record: ``{"id": str, "image": str | {"<image>": path} | {"<image_00>": path, ...} (optional),
"conversations": [{"role": "user"|"assistant", "content": str}, ...], "system": str (optional)}``. Image paths
are absolute or relative to the data file's directory. Every problem raises `BadRecord` naming the file, the record
id (or its position when the id is unknown) and a reason code from `REASONS`, which the run report counts.

Checks made here (cheap, no image decoding): UTF-8 text (an undecodable JSONL line or a lone surrogate is one bad
record), JSON syntax, the schema (a non-empty string or integer `id`), roles user/assistant alternating and starting
with user and ending with assistant, image tags (`<image>` only in the first user turn and only for a single image;
every `<image_NN>` tag has a dict entry and every entry is used exactly once), no reserved marker or control-token
string in the text or `system` (they would corrupt the image spans or end a turn early), image files present.
`validate_records` adds the split-level check: ids are unique.
"""
from __future__ import annotations

import codecs
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

IMAGE_TAG = "<image>"
MULTI_TAG_RE = re.compile(r"<image_\d+>")
# Strings a text must not contain, for every model family (a record valid for one model is valid for all): the
# tokenizer turns them into special tokens. The image markers would corrupt the image spans (image_bound); the
# ChatML (2.6) and Llama 3 (2.5) control strings would end or open a turn inside the text and be trained as such.
# They are rejected, not escaped: a fast tokenizer cannot encode them as plain text inside one rendered string.
# The tokenizer's other special tokens are checked per model in the workers (templates.find_control_token).
RESERVED = ("</image>", "<slice>", "</slice>", "<image_id>", "</image_id>", "<unk>",
            "<|im_start|>", "<|im_end|>", "<|endoftext|>",
            "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

REASONS = {
    "bad_encoding": "the record is not valid UTF-8 / Unicode text",
    "malformed_json": "the record is not valid JSON",
    "bad_schema": "a field is missing or has the wrong type",
    "bad_roles": "roles must alternate user/assistant, start with user and end with assistant",
    "duplicate_id": "another record of the split has the same id",
    "image_tag_mismatch": "image tags in the text do not match the record's images",
    "image_tag_later_turn": "a literal <image> tag outside the first user turn",
    "reserved_marker": "the text contains a reserved marker string",
    "image_missing": "an image file does not exist",
    "image_unreadable": "an image file is not a readable image",
    "image_tokens_too_long": "the image placeholders alone exceed data.model_max_length",
    "no_trainable_tokens": "no assistant token is left after truncation",
}


class BadRecord(ValueError):
    """One bad record: `file`, `record_id`, `reason` (a REASONS key) and a human `detail`."""

    def __init__(self, file: str, record_id: str, reason: str, detail: str):
        assert reason in REASONS, reason
        self.file, self.record_id, self.reason, self.detail = file, record_id, reason, detail
        super().__init__(f"{file}: record {record_id}: {reason}: {detail}")

    def __reduce__(self):  # picklable across Ray processes
        return BadRecord, (self.file, self.record_id, self.reason, self.detail)


class BadDataError(ValueError):
    """Several bad records at once (on_bad_record=error lists every problem found by the driver's checks)."""

    def __init__(self, bad: list[BadRecord], limit: int = 20):
        self.bad = bad
        lines = [str(b) for b in bad[:limit]] + ([f"... and {len(bad) - limit} more"] if len(bad) > limit else [])
        super().__init__(f"{len(bad)} bad record(s) (set data.on_bad_record=skip to drop them):\n  "
                         + "\n  ".join(lines))

    def __reduce__(self):
        return BadDataError, (self.bad,)


@dataclass(frozen=True)
class RawRecord:
    source: str  # data file
    index: int  # position in the file (0-based)
    text: str  # the record as JSON text, or "" with `error` set when the line could not be read as JSON
    error: str = ""
    error_reason: str = "malformed_json"  # the REASONS key of `error`


@dataclass(frozen=True)
class Record:
    id: str
    source: str
    conversations: list[dict]
    images: dict[str, str] = field(default_factory=dict)  # tag -> absolute path, in TEXT order of the tags
    system: Optional[str] = None


def read_raw_records(path: str | os.PathLike) -> Iterator[RawRecord]:
    """Yield the records of a .json (array), .jsonl or .parquet file as JSON text with their position.

    Text is UTF-8; a UTF-8 byte-order mark at the start of the file is ignored (editors on Windows write one). A
    JSONL line that is not valid UTF-8 or not valid JSON is one bad record; a .json array is one document, so any
    such problem fails the whole file (BadRecord with record "?").
    """
    path = str(path)
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory; a data file is one .json, .jsonl or .parquet file")
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            row = _drop_nulls(row)
            if "image" in row:
                row["image"] = _parquet_image(row["image"])
            yield RawRecord(path, i, json.dumps(row, ensure_ascii=False))
    elif suffix == ".jsonl":
        with open(path, "rb") as f:  # bytes: one undecodable line must not stop the reading of the others
            for i, line in enumerate(f):
                if i == 0 and line.startswith(codecs.BOM_UTF8):
                    line = line[len(codecs.BOM_UTF8):]
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield RawRecord(path, i, "", f"line {i + 1} is not valid UTF-8 (byte 0x{line[e.start]:02x} at "
                                                 f"column {e.start + 1})", "bad_encoding")
                    continue
                if text.strip():
                    yield _checked(path, i, text)
    else:
        data = Path(path).read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise BadRecord(path, "?", "bad_encoding",
                            f"the file is not valid UTF-8 (byte 0x{data[e.start]:02x} on line "
                            f"{data[:e.start].count(10) + 1}); a .json array is read as a whole: re-save it as "
                            "UTF-8, or use .jsonl, where a bad line is one bad record") from None
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:  # one document: nothing in it is usable
            raise BadRecord(path, "?", "malformed_json", f"the file is not valid JSON ({e})") from None
        if not isinstance(items, list):
            raise BadRecord(path, "?", "bad_schema", "a .json data file must hold a JSON array of records "
                                                     "(use .jsonl for one record per line)")
        for i, item in enumerate(items):
            yield RawRecord(path, i, json.dumps(item, ensure_ascii=False))


def _checked(path: str, index: int, line: str) -> RawRecord:
    try:
        json.loads(line)
    except json.JSONDecodeError as e:
        return RawRecord(path, index, "", f"line {index + 1} is not valid JSON ({e})")
    return RawRecord(path, index, line)


def _parquet_image(value):
    # A Parquet column has one type: multi-image records store a map<string, string> column (read back as a list
    # of (tag, path) pairs) or a JSON object string; single-image records a plain path string.
    if isinstance(value, list) and all(isinstance(v, (list, tuple)) and len(v) == 2 for v in value):
        return {k: v for k, v in value}
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _drop_nulls(row):
    # Parquet gives every row every column (missing values as None); treat None like an absent key.
    if isinstance(row, dict):
        return {k: _drop_nulls(v) for k, v in row.items() if v is not None}
    if isinstance(row, list):
        return [_drop_nulls(v) for v in row]
    return row


def _valid_id(value) -> bool:
    # The official format says str; integers are common in exported data and just as unambiguous.
    return (isinstance(value, str) and bool(value.strip())) or (isinstance(value, int) and not isinstance(value, bool))


def record_label(raw: RawRecord, data: object = None) -> str:
    """How errors name a record: its id when it has a valid one, else its position in the file."""
    if isinstance(data, dict) and _valid_id(data.get("id")):
        return repr(str(data["id"]))  # repr: quotes, and escapes a lone surrogate so the label prints anywhere
    return f"#{raw.index} (no id)"


def parse_record(raw: RawRecord, check_files: bool = True) -> Record:
    """Validate one raw record and return a Record with absolute image paths in text order."""
    if raw.error:
        raise BadRecord(raw.source, f"#{raw.index} (no id)", raw.error_reason, raw.error)
    data = json.loads(raw.text)
    rid = record_label(raw, data)

    def bad(reason: str, detail: str) -> BadRecord:
        return BadRecord(raw.source, rid, reason, detail)

    broken = _first_unencodable(data, "the record")
    if broken:  # JSON allows "\ud800" escapes; such a string is not text (the tokenizer raises TypeError on it)
        raise bad("bad_encoding", f"{broken} holds a lone surrogate (a \\uD800-\\uDFFF escape without its pair); "
                                  "it is not valid Unicode text")
    if not isinstance(data, dict):
        raise bad("bad_schema", f"a record must be a JSON object, got {type(data).__name__}")
    if "id" not in data:
        raise bad("bad_schema", "missing 'id'")
    if not _valid_id(data["id"]):
        raise bad("bad_schema", f"'id' must be a non-empty string (or an integer), got {json.dumps(data['id'])}")
    conv = data.get("conversations")
    if conv is None:
        raise bad("bad_schema", "missing 'conversations'")
    if not isinstance(conv, list) or not all(isinstance(m, dict) for m in conv):
        raise bad("bad_schema", "'conversations' must be a list of {role, content} objects")
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise bad("bad_schema", "'system' must be a string")
    for marker in (IMAGE_TAG,) + RESERVED:  # images are placed in the conversation only
        if system and marker in system:
            raise bad("reserved_marker", f"'system' contains {marker!r}")
    _check_roles(conv, bad)
    images = _check_images(data.get("image"), conv, raw.source, bad, check_files)
    return Record(id=str(data["id"]), source=raw.source, conversations=[dict(m) for m in conv], images=images,
                  system=system)


def validate_records(raws: Iterable[RawRecord], check_files: bool = True
                     ) -> Iterator[tuple[RawRecord, Optional[Record], Optional[BadRecord]]]:
    """`parse_record` over one split, plus the split-level rule: ids are unique (a later duplicate is bad)."""
    first_seen: dict[str, int] = {}
    for raw in raws:
        try:
            rec = parse_record(raw, check_files)
            first = first_seen.setdefault(rec.id, raw.index)
            if first != raw.index:
                raise BadRecord(raw.source, repr(rec.id), "duplicate_id",
                                f"record #{first} of {raw.source} has the same id; ids must be unique in a split")
        except BadRecord as e:
            yield raw, None, e
            continue
        yield raw, rec, None


def _first_unencodable(value, where: str) -> str:
    """The JSON path of the first string (key or value) that is not valid UTF-8 text, or ""."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
    elif isinstance(value, dict):
        for k, v in value.items():
            found = _first_unencodable(k, f"a key of {where}") or _first_unencodable(v, _join(where, k))
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _first_unencodable(v, f"{where}[{i}]")
            if found:
                return found
    return ""


def _join(where: str, key: str) -> str:
    return key if where == "the record" else f"{where}.{key}"


def _check_roles(conv: list[dict], bad) -> None:
    if len(conv) < 2:
        raise bad("bad_roles", f"need at least one user and one assistant turn, got {len(conv)} message(s)")
    for i, m in enumerate(conv):
        role, content = m.get("role"), m.get("content")
        if not isinstance(content, str):
            raise bad("bad_schema", f"conversations[{i}].content must be a string")
        # An empty or whitespace-only assistant turn is kept, as the official code keeps it: its end token is trained.
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise bad("bad_roles", f"conversations[{i}].role is {role!r}, expected {expected!r} "
                                   "(user and assistant must alternate, starting with user)")
        for marker in RESERVED:
            if marker in content:
                raise bad("reserved_marker", f"conversations[{i}] contains {marker!r}")
    if conv[-1].get("role") != "assistant":
        raise bad("bad_roles", "the last message must be from the assistant (nothing would be trained after it)")
    for i, m in enumerate(conv[1:], start=1):
        if IMAGE_TAG in m["content"]:
            raise bad("image_tag_later_turn", f"conversations[{i}] contains a literal <image>; a single image's tag "
                                              "belongs in the first user message (use <image_NN> tags for images "
                                              "in later turns)")


def _check_images(image, conv: list[dict], source: str, bad, check_files: bool) -> dict[str, str]:
    texts = [m["content"] for m in conv]
    tags_in_text = [t for text in texts for t in MULTI_TAG_RE.findall(text)]
    n_plain = sum(text.count(IMAGE_TAG) for text in texts)
    if isinstance(image, dict) and list(image) == [IMAGE_TAG]:
        image = image[IMAGE_TAG]  # {"<image>": path} is the official code's own form of a single image
    if image is None:
        if tags_in_text or n_plain:
            raise bad("image_tag_mismatch", "the text has image tags but the record has no 'image'")
        return {}
    if isinstance(image, str):
        if tags_in_text:
            raise bad("image_tag_mismatch", f"tag {tags_in_text[0]} needs an 'image' dict; a single 'image' path "
                                            "goes with <image> (or no tag)")
        if n_plain > 1:
            raise bad("image_tag_mismatch", f"<image> appears {n_plain} times for one image")
        ordered = {IMAGE_TAG: image}
    elif isinstance(image, dict) and image:
        if n_plain:
            raise bad("image_tag_mismatch", "literal <image> with an 'image' dict; use its <image_NN> tags")
        for key, value in image.items():
            if not MULTI_TAG_RE.fullmatch(key) or not isinstance(value, str):
                raise bad("bad_schema", f"'image' dict entries must be \"<image_NN>\": path, got {key!r}")
        for tag in tags_in_text:
            if tag not in image:
                raise bad("image_tag_mismatch", f"tag {tag} in the text has no entry in 'image'")
        unused = [k for k in image if k not in tags_in_text]
        if unused:
            raise bad("image_tag_mismatch", f"'image' entry {unused[0]} is never referenced in the text")
        repeated = sorted({t for t in tags_in_text if tags_in_text.count(t) > 1})
        if repeated:
            raise bad("image_tag_mismatch", f"tag {repeated[0]} appears more than once")
        ordered = {tag: image[tag] for tag in tags_in_text}  # text order decides crop order and image ids
    else:
        raise bad("bad_schema", "'image' must be a path string, {\"<image>\": path} or a non-empty "
                                "{\"<image_NN>\": path} dict")
    base = os.path.dirname(os.path.abspath(source))
    # joined, not normalised: "../" after a linked folder means the link target's parent to the file system, and
    # os.path.normpath would fold it away by text (another file, or none). join keeps an absolute path as it is.
    resolved = {tag: os.path.join(base, p) for tag, p in ordered.items()}
    if check_files:
        for tag, p in resolved.items():
            if not os.path.isfile(p):
                raise bad("image_missing", f"{tag} -> {p} does not exist")
    return resolved
