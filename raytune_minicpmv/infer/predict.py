"""`raytune-minicpmv predict`: batch generation over a records file with Ray Data `map_batches` on model actors.

    summary = run_predict(cfg, "ckpt_dir", "records.json", "preds.jsonl", adapter=None, actors=2)

Every record (the fine-tune format; the last turn is a question, or an answer that becomes the `reference`) gets one
JSON line in `out`: ``{"id": ..., "output": "...", "reference": "..."}`` (reference only when the record has one), or
``{"id": ..., "error": "..."}`` for a bad record with data.on_bad_record=skip (with =error the run stops before any
generation, listing every bad record). The actors (`generate.num_actors`, `--actors`) each load the model once
(GPU when the cluster has one, in model.dtype; else CPU in fp32) and preprocess their records as training does
(infer.prompts), then generate `generate.batch_size` records per call.

Safe to rerun: lines arrive in `<out>.partial` as the actors finish them; at the end the lines of `out`, of the
partial file and of this run are written in record order to a temporary file renamed onto `out`. A rerun (after a
crash, Ctrl-C, or with more records) skips the ids that already have an output there.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Optional

log = logging.getLogger(__name__)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class Predictor:
    """The `map_batches` actor: one model replica; a pyarrow batch of raw records -> their outputs."""

    def __init__(self, model_dir: str, adapter: Optional[str], dtype: str, llm_type: Optional[str],
                 max_slice_nums: int, max_length: int, on_bad_record: str, settings: dict, threads: int,
                 downsample_mode: Optional[str] = None):
        import torch

        from .generation import GenerationSettings, load_for_inference, stop_token_ids

        gpu = torch.cuda.is_available() and bool(os.environ.get("CUDA_VISIBLE_DEVICES", "x"))
        if not gpu:
            torch.set_num_threads(max(1, threads))
        self.device = "cuda" if gpu else "cpu"
        self.model, self.tok, self.spec = load_for_inference(
            model_dir, adapter, dtype=getattr(torch, DTYPES[dtype]) if gpu else torch.float32, device=self.device,
            llm_type=llm_type, max_slice_nums=max_slice_nums, downsample_mode=downsample_mode)
        self.downsample_mode = getattr(self.spec, "downsample_mode", None)  # 4.6 / 4.7 (Spec4): to the model too
        self.settings = GenerationSettings(**settings)
        self.stops = stop_token_ids(self.tok.tokenizer)
        self.max_length, self.on_bad_record = max_length, on_bad_record

    def __call__(self, batch) -> dict:
        from ..data.records import RawRecord
        from .generation import decode, generate, to_device
        from .prompts import prompt_batch, prompt_of, prompt_rows, table_rows

        raws = [RawRecord(s, int(i), t) for s, i, t in zip(
            *(batch.column(c).to_pylist() for c in ("source", "index", "text")))]
        rows, has = prompt_rows(raws, self.spec, self.tok, self.max_length, self.on_bad_record)
        good = [k for k, r in enumerate(rows) if not r.skip_reason]
        errors = {k: f"{rows[k].skip_reason}: {rows[k].skip_detail}" for k in range(len(rows)) if k not in good}
        ids = [r.id for r in rows]
        prompts = [prompt_of(r, has[k], self.spec.patch_size) for k, r in
                   zip(good, table_rows([rows[k] for k in good], self.spec.patch_size))]
        outputs = {}
        if prompts:
            batch = prompt_batch(prompts, downsample_mode=self.downsample_mode)
            new = generate(self.model, to_device(batch, self.device), self.settings, self.stops)
            outputs = {k: (decode(self.tok.tokenizer, n), decode(self.tok.tokenizer, p.reference_ids)
                           if p.has_reference else None) for k, p, n in zip(good, prompts, new)}
        lines = []
        for k in range(len(rows)):
            if k in errors:
                lines.append({"id": ids[k], "error": errors[k]})
            else:
                out, ref = outputs[k]
                lines.append({"id": ids[k], "output": out, **({"reference": ref} if ref is not None else {})})
        return {"line": [json.dumps(x, ensure_ascii=False) for x in lines], "actor": [os.getpid()] * len(lines)}


def run_predict(cfg, model_dir: str, data_path: str, out_path: str, adapter: Optional[str] = None,
                actors: Optional[int] = None) -> dict:
    """Generate for every record of `data_path` not yet in `out_path`; returns a summary (counts, seconds, actors)."""
    import ray

    from ..cluster.ray_session import init_ray

    t0 = time.perf_counter()
    records, bad = read_prompt_records(data_path, cfg.data.on_bad_record)
    partial = out_path + ".partial"
    done = {**read_lines(out_path), **read_lines(partial)}
    todo = [r for rid, r in records if rid not in done or "output" not in done[rid]]
    g = cfg.generate
    actors = actors or g.num_actors
    summary = {"records": len(records) + len(bad), "already_done": len(records) - len(todo), "generated": 0,
               "errors": len(bad), "actors": set()}
    if todo:
        init_ray(cfg)
        num_gpus = g.num_gpus_per_actor if g.num_gpus_per_actor is not None else \
            (1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0)
        items = [{"source": r.source, "index": r.index, "text": r.text} for r in todo]
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / g.batch_size)))
        settings = {k: getattr(g, k) for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                                               "repetition_penalty")}
        settings["seed"] = g.seed if g.seed is not None else cfg.run.seed
        ds = ds.map_batches(Predictor, batch_size=g.batch_size, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=g.num_cpus_per_actor,
                            num_gpus=num_gpus, fn_constructor_kwargs=dict(
                                model_dir=str(model_dir), adapter=adapter, dtype=cfg.model.dtype,
                                llm_type=cfg.data.llm_type, max_slice_nums=cfg.data.max_slice_nums,
                                max_length=cfg.data.model_max_length, on_bad_record=cfg.data.on_bad_record,
                                settings=settings, threads=max(1, int(g.num_cpus_per_actor)),
                                downsample_mode=cfg.model.downsample_mode))
        ds.context.raise_original_map_exception = True  # a worker's BadRecord reaches the user as itself
        log.info("predict: %d record(s) on %d actor(s) (%s)", len(todo), actors, "GPU" if num_gpus else "CPU")
        _end_torn_line(partial)  # a crash mid-write left half a line: the next line must not be glued to it
        with open(partial, "a", encoding="utf-8") as f:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for line, actor in zip(batch["line"], batch["actor"]):
                    f.write(str(line) + "\n")
                    summary["actors"].add(int(actor))
                    summary["generated"] += 1
                f.flush()
        done.update(read_lines(partial))
    for b in bad:
        done[b.record_id.strip("'")] = {"id": b.record_id.strip("'"), "error": f"{b.reason}: {b.detail}"}
    write_ordered(out_path, [rid for rid, _ in records] + [b.record_id.strip("'") for b in bad], done)
    if os.path.exists(partial):
        os.remove(partial)
    summary["errors"] = sum(1 for v in done.values() if "error" in v)
    summary["actors"] = len(summary["actors"])
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def read_prompt_records(path: str, on_bad_record: str):
    """[(id, RawRecord)] of the usable records, and the bad ones (BadDataError with on_bad_record=error). Records
    may end with a question; ids must be unique (a rerun finds its outputs by id)."""
    from ..data.records import BadDataError, BadRecord, parse_record, read_raw_records
    from .prompts import with_answer_slot

    good, bad, seen = [], [], set()
    for raw in read_raw_records(path):
        try:
            rec = parse_record(with_answer_slot(raw)[0], check_files=True)
            if rec.id in seen:
                raise BadRecord(raw.source, repr(rec.id), "duplicate_id", "another record has this id")
            seen.add(rec.id)
            good.append((rec.id, raw))
        except BadRecord as e:
            bad.append(e)
    if bad and on_bad_record == "error":
        raise BadDataError(bad)
    return good, bad


def read_lines(path: str) -> dict[str, dict]:
    """id -> line of a (possibly partial) predictions file; a torn last line (a crash mid-write) is ignored."""
    out = {}
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "id" in obj:
                out[str(obj["id"])] = obj
    return out


def _end_torn_line(path: str) -> None:
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.seek(0, os.SEEK_END)
                f.write(b"\n")


def write_ordered(out_path: str, ids: list[str], lines: dict[str, dict]) -> None:
    """`out_path` = the lines of `ids` (in that order), written to a temporary file and renamed (never torn)."""
    tmp = f"{out_path}.tmp.{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for rid in ids:
            if rid in lines:
                f.write(json.dumps(lines[rid], ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)
