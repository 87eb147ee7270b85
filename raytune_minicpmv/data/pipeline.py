"""The data stage on Ray: records -> Ray Data `map_batches` on CPU actors -> rows (streamed, or Parquet + report).

    raytune-minicpmv preprocess --config configs/demo.yaml          # = run_preprocess(cfg)
    ds = build_dataset(cfg, "train")      # what TorchTrainer gets: preprocessed Parquet or a streaming pipeline
    it = shard.iter_torch_batches(batch_size=2, collate_fn=collate)   # in the train worker

The story of `run_preprocess`: start/join Ray -> read the model-side constants (query_num, slicing, llm_type) and
the tokenizer path -> per split: the driver reads and checks every record (cheap: UTF-8, JSON, schema, unique ids,
roles, tags, files exist; one error lists every problem when on_bad_record=error) -> Ray Data decodes, slices,
templates and tokenizes in actors (`compute=ActorPoolStrategy`, `data.num_cpus_per_task` each, the tokenizer loaded
once per actor) -> rows are written as Parquet to a temporary dir, the small report columns are read back, the split
must keep a record and stay under the skip cap, and the dir is renamed into place -> `report.json` is written last
(its presence means "done"; tune reuses it while its input fingerprint, `data_fingerprint.py`, still matches the
data files, tokenizer and settings). A split that fails leaves `report.failed.json` instead.

Skipped records are kept in the Parquet as tombstone rows (empty tensors + `skip_reason`), so the report can name
them and nothing is lost silently; `build_dataset` filters them out.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from typing import Optional

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

from ..config import Config, DataConfig, is_uri, join_uri, resolve_llm_type
from .family4 import Spec4
from .fingerprint import inputs_fingerprint
from .pipeline4 import Preprocessor4, model_side4
from .records import REASONS, BadDataError, BadRecord, RawRecord, read_raw_records, validate_records
from .rows import ROW_SCHEMA, collate_rows, preprocess_records, rows_to_table, table_to_numpy
from .rows4 import ROW_SCHEMA4
from .templates import ModelSpec, TokenizerInfo, model_spec_from_config

log = logging.getLogger(__name__)

REPORT_COLUMNS = ["id", "source", "num_images", "crops_per_image", "num_tokens", "num_image_tokens",
                  "num_trainable", "skip_reason", "skip_detail"]
# Ray Data's own tiny operators (filter, Parquet read/write) ask for this much CPU: next to train workers that
# hold whole CPUs, an op asking for 1 CPU would never be scheduled (see docs/DATA.md, "Resources").
SMALL_CPU = 0.05


class SplitError(ValueError):
    """A split cannot be used; `stats` is its report (also written to report.failed.json)."""

    def __init__(self, message: str, stats: Optional[dict] = None):
        super().__init__(message)
        self.stats = stats


class SkipCapError(SplitError):
    """on_bad_record=skip dropped more than data.max_skip_fraction of a split."""


class EmptySplitError(SplitError):
    """A split has no usable record (an empty file, or every record bad)."""


class Collate(NumpyBatchCollateFn):
    """`iter_torch_batches(collate_fn=collate)`: rows -> the model batch of docs/ARCHITECTURE.md."""

    def __call__(self, batch: dict) -> dict:
        return collate_rows(batch)


collate = Collate()


class Preprocessor:
    """The `map_batches` actor: loads the tokenizer once, turns a pyarrow batch of raw records into rows."""

    def __init__(self, spec: dict, tokenizer_path: str, max_length: int, on_bad_record: str):
        self.spec = ModelSpec(**spec)
        self.tok = TokenizerInfo.load(tokenizer_path)
        self.max_length, self.on_bad_record = max_length, on_bad_record

    def __call__(self, batch):
        raws = [RawRecord(s, int(i), t, e) for s, i, t, e in zip(
            *(batch.column(c).to_pylist() for c in ("source", "index", "text", "error")))]
        return rows_to_table(preprocess_records(raws, self.spec, self.tok, self.max_length, self.on_bad_record),
                             self.spec.patch_size)


# --------------------------------------------------------------------------------------------------------------
# Entry points


def run_preprocess(cfg: Config) -> dict:
    """Preprocess train (+ eval) into Parquet under `cfg.data_output_path`, write report.json, return the report.

    A split that cannot be used (every record bad, an empty file, the skip cap) raises a SplitError after writing
    the report so far to `report.failed.json`; `report.json` is written only when every split succeeded.
    """
    from ..cluster.ray_session import check_storage, init_ray

    init_ray(cfg)
    check_storage(cfg.run)  # multi-node: the Parquet output must be visible from every node
    spec, tokenizer_path = model_side(cfg)
    out = cfg.data_output_path
    done, failed = join_uri(out, "report.json"), join_uri(out, "report.failed.json")
    for stale in (done, failed):  # an old report must not vouch for (or against) this run's output
        _remove_file(stale)
    report = {"output_path": out, "model_spec": spec.__dict__, "tokenizer_path": tokenizer_path,
              "model_max_length": cfg.data.model_max_length, "on_bad_record": cfg.data.on_bad_record, "splits": {},
              "fingerprint": inputs_fingerprint(cfg.data, spec, tokenizer_path)}  # before reading: what the rows are of
    for split, path in (("train", cfg.data.train_path), ("eval", cfg.data.eval_path)):
        if not path:
            continue
        try:
            report["splits"][split] = _preprocess_split(cfg.data, spec, tokenizer_path, split, path,
                                                        join_uri(out, split))
        except SplitError as e:
            report["splits"][split], report["error"] = e.stats, str(e)
            _write_json(failed, report)
            print(format_report(report), flush=True)
            raise
    _write_json(done, report)  # last: its presence means the output is complete
    print(format_report(report), flush=True)
    return report


def build_dataset(cfg: Config, split: str = "train"):
    """The rows of one split as a lazy `ray.data.Dataset` (None when the split does not exist).

    `data.preprocessed=true`: read `<data_output_path>/<split>` Parquet (written by run_preprocess). Otherwise run
    the preprocessing pipeline on the raw records, streaming (each epoch re-runs it: preprocess once for Tune).
    """
    import ray

    if cfg.data.preprocessed:
        path = join_uri(cfg.data_output_path, split)
        if not is_uri(path) and not os.path.isdir(path):
            if split == "train":
                raise FileNotFoundError(f"{path}: no preprocessed train split (run `raytune-minicpmv preprocess`)")
            return None
        # Ray 2.60's V2 Parquet reader adds a ListFiles task that asks for a whole CPU whatever num_cpus says; next to
        # CPU train workers holding fractional CPUs it never schedules (a silent hang). The V1 reader honours num_cpus.
        ctx = ray.data.DataContext.get_current()
        ctx.use_datasource_v2 = False
        ctx.enable_progress_bars = False  # re-read every epoch by every trial: its bars would flood the run log
        ds = ray.data.read_parquet(path, num_cpus=SMALL_CPU)
        return ds.filter(expr="skip_reason == ''", num_cpus=SMALL_CPU)
    path = cfg.data.train_path if split == "train" else cfg.data.eval_path
    if not path:
        return None
    spec, tokenizer_path = model_side(cfg)
    raws, bad = read_and_check(path, cfg.data.on_bad_record)
    skipped = Counter(b.reason for b in bad)
    _check_usable(split, path, len(raws) + len(bad), len(raws), skipped, cfg.data)  # only what the driver can see
    return _map_rows(cfg.data, spec, tokenizer_path, raws, keep_skipped=False)


def preprocess_for_check(model_dir, data_path, index: int = 0, max_length: int = 2048) -> dict:
    """One record of a data file as a collated model batch, without Ray (merge verification, demo checks)."""
    from ..models.processor4 import family4_of
    from ..models.registry import get_family

    raw = list(read_raw_records(data_path))[index]
    if family4_of(model_dir):  # 4.6/4.7: transformers' processor with the checkpoint's own settings
        from .rows4 import preprocess_records4, rows_to_table4

        spec4 = Spec4(family=family4_of(model_dir), model_path=str(model_dir), downsample_mode=None,
                      max_slice_nums=None)  # the checkpoint's own processor settings
        rows4 = preprocess_records4([raw], spec4.load(), spec4.family, max_length, "error")
        return collate_rows(table_to_numpy(rows_to_table4(rows4)))
    spec = model_spec_from_config(model_dir, get_family(model_dir).llm_type)
    rows = preprocess_records([raw], spec, TokenizerInfo.load(model_dir), max_length, "error")
    return collate_rows(table_to_numpy(rows_to_table(rows, spec.patch_size)))


# --------------------------------------------------------------------------------------------------------------
# Steps


def model_side(cfg: Config) -> tuple[ModelSpec | Spec4, str]:
    """ModelSpec from model.path's config.json (data.max_slice_nums overrides) and the tokenizer directory.

    4.6/4.7 (pipeline4.family4): a Spec4 instead; its rows come from transformers' processor (docs/DATA.md)."""
    spec4 = model_side4(cfg)
    if spec4 is not None:
        return spec4, cfg.data.tokenizer_path or cfg.model.path
    spec = model_spec_from_config(cfg.model.path, resolve_llm_type(cfg), cfg.data.max_slice_nums)
    return spec, cfg.data.tokenizer_path or cfg.model.path


def read_and_check(path: str, on_bad_record: str) -> tuple[list[RawRecord], list[BadRecord]]:
    """Driver-side checks of every record (and unique ids). Error mode: one BadDataError listing every bad record."""
    raws, bad = [], []
    for raw, _, error in validate_records(read_raw_records(path)):
        if error is None:
            raws.append(raw)
        else:
            bad.append(error)
    if bad and on_bad_record == "error":
        raise BadDataError(bad)
    for b in bad:
        log.warning("skipping bad record: %s", b)
    return raws, bad


def _map_rows(d: DataConfig, spec: ModelSpec, tokenizer_path: str, raws: list[RawRecord], keep_skipped: bool):
    import ray

    items = [{"source": r.source, "index": r.index, "text": r.text, "error": r.error} for r in raws]
    blocks = max(1, min(len(items) // d.map_batch_size, 512))
    four = isinstance(spec, Spec4)
    ds = ray.data.from_items(items, override_num_blocks=blocks) if items else ray.data.from_arrow(
        (ROW_SCHEMA4 if four else ROW_SCHEMA).empty_table())
    if items:
        ds = ds.map_batches(Preprocessor4 if four else Preprocessor, batch_size=d.map_batch_size,
                            batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=d.max_tasks),
                            num_cpus=d.num_cpus_per_task,
                            fn_constructor_kwargs=dict(spec=spec.__dict__, tokenizer_path=tokenizer_path,
                                                       max_length=d.model_max_length,
                                                       on_bad_record=d.on_bad_record))
    if not keep_skipped:
        ds = ds.filter(expr="skip_reason == ''", num_cpus=SMALL_CPU)
    # on_bad_record=error: let a worker's BadRecord reach the driver as itself (file, id, reason), not wrapped in
    # Ray Data's generic UserCodeException. Set on this dataset's context only.
    ds.context.raise_original_map_exception = True
    return ds


def _preprocess_split(d: DataConfig, spec: ModelSpec, tokenizer_path: str, split: str, path: str, dest: str) -> dict:
    t0 = time.perf_counter()
    raws, bad = read_and_check(path, d.on_bad_record)
    log.info("%s: %d records pass the driver checks, %d rejected; preprocessing on Ray Data", path, len(raws),
             len(bad))
    tmp = dest.rstrip("/") + ".tmp"
    _remove(tmp)
    records_in = len(raws) + len(bad)
    try:
        # what the driver already knows fails before any Ray work (an empty split, or the cap already exceeded)
        _check_usable(split, path, records_in, len(raws), Counter(b.reason for b in bad), d)
        ds = _map_rows(d, spec, tokenizer_path, raws, keep_skipped=True)
        try:
            ds.write_parquet(tmp, ray_remote_args={"num_cpus": SMALL_CPU})
        except Exception as e:  # noqa: BLE001 - surface a BadRecord from inside Ray's wrapper as itself
            bad_record = _find_bad_record(e)
            if bad_record is None:
                raise
            raise bad_record from e
        stats = split_stats(tmp, bad, records_in, time.perf_counter() - t0)
        _check_usable(split, path, records_in, stats["records_out"], Counter(stats["skipped"]), d)
    except SplitError as e:
        e.stats = split_stats(tmp, bad, records_in, time.perf_counter() - t0)
        _remove(tmp)
        raise
    _remove(dest)
    _rename(tmp, dest)
    stats["path"] = dest
    return stats


def split_stats(parquet_dir: str, driver_bad: list[BadRecord], records_in: int, seconds: float) -> dict:
    """The report of one split from the Parquet's small columns (no pixel data is read)."""
    import pyarrow.dataset as pads

    t = pads.dataset(parquet_dir, format="parquet").to_table(columns=REPORT_COLUMNS) if _exists_dir(
        parquet_dir) else ROW_SCHEMA.empty_table().select(REPORT_COLUMNS)
    reasons = t.column("skip_reason").to_pylist()
    good = [i for i, r in enumerate(reasons) if not r]
    skipped = Counter(r for r in reasons if r) + Counter(b.reason for b in driver_bad)
    examples = [{"file": b.file, "record": b.record_id, "reason": b.reason, "detail": b.detail}
                for b in driver_bad[:10]]
    for i, r in enumerate(reasons):
        if r and len(examples) < 20:
            examples.append({"file": t.column("source")[i].as_py(), "record": t.column("id")[i].as_py(),
                             "reason": r, "detail": t.column("skip_detail")[i].as_py()})
    tokens = np.asarray(t.column("num_tokens").to_pylist(), dtype=np.int64)[good]
    crops = Counter(c for i in good for c in (t.column("crops_per_image")[i].as_py() or []))
    pct = {f"p{q}": int(np.percentile(tokens, q)) for q in (50, 90, 99)} if len(tokens) else {}
    return {
        "records_in": records_in, "records_out": len(good), "skipped": dict(sorted(skipped.items())),
        "skipped_examples": examples,
        "images": int(sum(t.column("num_images").to_pylist()[i] for i in good)),
        "crops_per_image": {str(k): v for k, v in sorted(crops.items())},
        "tokens": dict(pct, max=int(tokens.max()) if len(tokens) else 0, mean=float(tokens.mean()) if len(tokens)
                       else 0.0, total=int(tokens.sum())),
        "trainable_tokens": int(sum(t.column("num_trainable").to_pylist()[i] for i in good)),
        "seconds": round(seconds, 3), "records_per_s": round(records_in / seconds, 2) if seconds > 0 else None,
    }


def _check_usable(split: str, path: str, records_in: int, records_out: int, skipped: Counter, d: DataConfig) -> None:
    """A split must keep at least one record, and (skip mode) lose at most data.max_skip_fraction of them."""
    n = sum(skipped.values())
    detail = ", ".join(f"{k}: {v}" for k, v in skipped.most_common())
    if records_out == 0:
        why = "the file holds no records" if records_in == 0 else f"all {records_in} records are bad ({detail})"
        raise EmptySplitError(f"data.{split}_path: {path}: the {split} split has no usable record: {why}; fix the "
                              "data (the report lists the skipped records)")
    if records_in and n / records_in > d.max_skip_fraction:
        raise SkipCapError(f"{path}: {n} of {records_in} records skipped ({n / records_in:.1%}) > "
                           f"data.max_skip_fraction={d.max_skip_fraction:g} ({detail}); fix the data or "
                           "raise the cap")


def format_report(report: dict) -> str:
    lines = [f"preprocessed data: {report['output_path']}"]
    for split, s in report["splits"].items():
        lines.append(f"[{split}] records in {s['records_in']}, out {s['records_out']}, skipped "
                     f"{sum(s['skipped'].values())} {s['skipped'] or ''}")
        lines.append(f"[{split}] images {s['images']}, crops per image {s['crops_per_image']}")
        lines.append(f"[{split}] tokens {s['tokens']}, trainable {s['trainable_tokens']}")
        lines.append(f"[{split}] {s['seconds']} s, {s['records_per_s']} records/s")
        for ex in s["skipped_examples"][:5]:
            lines.append(f"[{split}]   skipped {ex['file']}: record {ex['record']}: {ex['reason']}: {ex['detail']}")
    if report.get("error"):
        lines.append(f"FAILED (report.failed.json): {report['error']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Small helpers (local paths get temp-dir + rename; URIs are written in place)


def _find_bad_record(e: Optional[BaseException]) -> Optional[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError keeps the worker's exception here
        if isinstance(cause, (BadRecord, BadDataError)):
            return cause
        if isinstance(e, (BadRecord, BadDataError)):
            return e
        e = cause or e.__cause__ or e.__context__
    return None


def _exists_dir(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, p = _fs(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def _fs(path: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(path) if is_uri(path) else (pafs.LocalFileSystem(), path)


def _remove(path: str) -> None:
    import pyarrow.fs as pafs

    fs, p = _fs(path)
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir(p)


def _remove_file(path: str) -> None:
    import pyarrow.fs as pafs

    fs, p = _fs(path)
    if fs.get_file_info(p).type == pafs.FileType.File:
        fs.delete_file(p)


def _rename(src: str, dst: str) -> None:
    fs, s = _fs(src)
    fs.move(s, _fs(dst)[1])  # a rename on local/shared filesystems; a copy on object stores


def _write_json(path: str, obj: dict) -> None:
    fs, p = _fs(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p + ".tmp") as f:
        f.write((json.dumps(obj, indent=2, default=str) + "\n").encode())
    fs.move(p + ".tmp", p)


__all__ = ["collate", "Collate", "build_dataset", "run_preprocess", "preprocess_for_check", "REASONS", "SplitError",
           "SkipCapError", "EmptySplitError"]
