"""What preprocessed Parquet was made from, so a rerun never trains on rows of other inputs.

    fp = inputs_fingerprint(cfg.data, spec, tokenizer_path)  # stored in <data_output_path>/report.json
    reasons = stale_reasons(report.get("fingerprint"), fp) # [] when the stored rows still match the inputs

The fingerprint covers every input of a row: each data file (path, size, SHA-256 of its content — content, not
mtime, so a copy or a `touch` does not force a redo), the model-side constants (`ModelSpec`: query tokens, slicing,
patch size, llm type), the tokenizer directory's small files (tokenizer, vocab, special tokens, chat template,
config.json; weights skipped), and the preprocessing settings. Images a record names by path are not hashed (that
would read the whole image set): replace the record file, or delete `<run>/data`, after editing images in place.
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional

from ..config import Config, DataConfig, is_uri

VERSION = 1  # bump when the row format changes: old Parquet is then redone
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_SMALL = 64 << 20


def inputs_fingerprint(d: DataConfig, spec, tokenizer_path: str) -> dict:
    return {
        "version": VERSION,
        "data": {split: _file_entry(path) for split, path in (("train", d.train_path), ("eval", d.eval_path))
                 if path},
        "model_spec": dict(spec.__dict__),
        "tokenizer": _dir_hashes(tokenizer_path) | _processor_hashes(spec, tokenizer_path),
        "settings": {"model_max_length": d.model_max_length, "max_slice_nums": d.max_slice_nums,
                     "on_bad_record": d.on_bad_record, "max_skip_fraction": d.max_skip_fraction,
                     "llm_type": d.llm_type},
    }


def stale_reasons(stored: Optional[dict], current: dict) -> list[str]:
    """Why rows made from `stored` inputs do not match `current` ones, one line per difference."""
    if not stored:
        return ["the preprocessed data has no input fingerprint (written by an older version)"]
    reasons = []
    if stored.get("version") != current["version"]:
        reasons.append(f"row format version {stored.get('version')} -> {current['version']}")
    for split in sorted(set(stored.get("data", {})) | set(current["data"])):
        old, new = stored.get("data", {}).get(split), current["data"].get(split)
        if old is None or new is None:
            reasons.append(f"data.{split}: {'added' if old is None else 'removed'}")
        elif old != new:
            what = "path" if old["path"] != new["path"] else "content"
            reasons.append(f"data.{split}: {what} changed ({old['path']}, {old['size']} bytes -> {new['path']}, "
                           f"{new['size']} bytes)")
    if stored.get("model_spec") != current["model_spec"]:
        reasons.append(f"model side changed: {stored.get('model_spec')} -> {current['model_spec']}")
    old_tok, new_tok = stored.get("tokenizer", {}), current["tokenizer"]
    changed = sorted(k for k in set(old_tok) | set(new_tok) if old_tok.get(k) != new_tok.get(k))
    if changed:
        reasons.append(f"tokenizer files changed: {', '.join(changed)}")
    for key, value in current["settings"].items():
        if stored.get("settings", {}).get(key) != value:
            reasons.append(f"data.{key}: {stored.get('settings', {}).get(key)!r} -> {value!r}")
    return reasons


def _processor_hashes(spec, tokenizer_path: str) -> dict:
    # 4.6/4.7 (data.family4.Spec4): the processor configs and chat template come from model.path
    model_path = getattr(spec, "model_path", None)
    if not model_path or os.path.abspath(model_path) == os.path.abspath(tokenizer_path):
        return {}
    return {f"model.path/{k}": v for k, v in _dir_hashes(model_path).items()}


def _file_entry(path: str) -> dict:
    if is_uri(path):
        return {"path": path, "size": None, "sha256": None}  # remote record files: compared by path only
    return {"path": os.path.abspath(path), "size": os.path.getsize(path), "sha256": _sha256(path)}


def _dir_hashes(directory: str) -> dict:
    if is_uri(directory) or not os.path.isdir(directory):
        return {}
    out = {}
    for name in sorted(os.listdir(directory)):
        p = os.path.join(directory, name)
        if os.path.isfile(p) and not name.endswith(_WEIGHTS) and os.path.getsize(p) <= _SMALL:
            out[name] = _sha256(p)
    return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stale_preprocessed(cfg: Config) -> Optional[list[str]]:
    """None: no complete preprocessed output at `cfg.data_output_path`; []: it matches the inputs; else the
    reasons it does not (local output paths; on an object store the output is trusted as is)."""
    import json

    from ..config import join_uri
    from .pipeline import model_side

    report = join_uri(cfg.data_output_path, "report.json")
    if is_uri(report):
        return [] if _uri_exists(report) else None
    if not os.path.exists(report):
        return None
    with open(report) as f:
        stored = json.load(f).get("fingerprint")
    spec, tokenizer_path = model_side(cfg)
    return stale_reasons(stored, inputs_fingerprint(cfg.data, spec, tokenizer_path))


def _uri_exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, p = pafs.FileSystem.from_uri(uri)
    return fs.get_file_info(p).type == pafs.FileType.File
