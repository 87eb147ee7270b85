"""Data-stage throughput: our batch preprocessing vs a per-sample baseline shaped like the official script.

    .venv/bin/python benchmarks/data_throughput.py                 # ~2-3 min on 2 cores: 32 records + Ray 1 vs 2 CPUs
    .venv/bin/python benchmarks/data_throughput.py --records 64 --no-ray

Dataset: generated photo-like images of 0.3-4 MP (smooth gradients + noise + shapes), half JPEG, half PNG, one
image per record, MiniCPM-V 2.6 (qwen2 template, real vendored 2.6 tokenizer, query_num 64, max_slice_nums 9).

Baseline (mirrors `finetune/dataset.py`): one process, one record at a time: `Image.open().convert("RGB")`, slice
with PIL BICUBIC, per crop ToTensor-like (`torch.from_numpy(...).permute().float().div(255)`) + Normalize
(`sub_(0.5).div_(0.5)`) + unfold patch packing, then `tokenizer.apply_chat_template(tokenize=True)` per record and a
token scan for labels / image bounds. Ours: `rows.preprocess_records` in batches (one tokenizer call per batch,
uint8 packing straight into the Arrow buffer) + `rows.collate_rows`' normalize (which runs in the train worker).
Outputs are asserted identical (input_ids, labels, image_bound, tgt_sizes, every float32 pixel).

Throughput per core = records / CPU seconds of this process (time.process_time, torch and BLAS pinned to one
thread), so other load on the machine does not skew it; wall-clock numbers are printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raytune_minicpmv.data.images import load_rgb  # noqa: E402
from raytune_minicpmv.data.records import parse_record, read_raw_records  # noqa: E402
from raytune_minicpmv.data.rows import collate_rows, preprocess_records, rows_to_table, table_to_numpy  # noqa: E402
from raytune_minicpmv.data.slicing import plan_slices, slice_image  # noqa: E402
from raytune_minicpmv.data.templates import (ModelSpec, TokenizerInfo, build_messages, encode_texts,  # noqa: E402
                                        image_placeholder, render_text)

TOKENIZER = REPO / "tests" / "assets" / "minicpmv26_tokenizer"
SPEC = ModelSpec("qwen2", query_num=64, max_slice_nums=9)
SIZES = [(640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200), (2048, 1536), (2304, 1728), (1000, 1000),
         (1920, 1080), (720, 1280)]  # 0.3 - 4.0 MP


def make_dataset(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], -1)
        arr = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        d = ImageDraw.Draw(img)
        for _ in range(5):
            x, y = int(rng.integers(0, w - 50)), int(rng.integers(0, h - 50))
            d.ellipse([x, y, x + 50 + int(rng.integers(0, w // 3)), y + 50 + int(rng.integers(0, h // 3))],
                      fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        name = f"img/{i:04d}.{'jpg' if i % 2 == 0 else 'png'}"
        img.save(root / name, **({"quality": 90} if i % 2 == 0 else {}))
        recs.append({"id": f"r{i}", "image": name, "conversations": [
            {"role": "user", "content": "<image>\nDescribe the picture in detail."},
            {"role": "assistant", "content": f"A gradient with five ellipses; image number {i}, size {w}x{h}."}]})
    path = root / "data.json"
    path.write_text(json.dumps(recs))
    return path


# --------------------------------------------------------------------------------------------------------------
# The baseline: per sample, torch ops, apply_chat_template per record (the official script's shape)


def baseline_sample(raw, tok: TokenizerInfo, timers: dict) -> dict:
    rec = parse_record(raw, check_files=False)
    t = time.process_time()
    img = Image.open(next(iter(rec.images.values()))).convert("RGB")
    timers["decode"] += time.process_time() - t
    t = time.process_time()
    plan = plan_slices(img.size, SPEC.max_slice_nums)
    crops = slice_image(img, plan)
    timers["resize+crop"] += time.process_time() - t
    t = time.process_time()
    pixels = []
    for c in crops:
        x = torch.from_numpy(np.array(c, copy=True)).permute(2, 0, 1).contiguous().float().div(255)
        x.sub_(0.5).div_(0.5)
        p = torch.nn.functional.unfold(x, (14, 14), stride=(14, 14))
        pixels.append(p.reshape(3, 14, 14, -1).permute(0, 1, 3, 2).reshape(3, 14, -1))
    tgt = torch.tensor([[c.size[1] // 14, c.size[0] // 14] for c in crops], dtype=torch.int32)
    timers["to-tensor+normalize+pack"] += time.process_time() - t
    t = time.process_time()
    msgs = build_messages(rec, [image_placeholder(SPEC, plan.grid, 0)])
    chat = [{"role": m["role"], "content": m["content"]} for m in msgs]
    ids = torch.tensor(tok.tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=False,
                                                          return_dict=False), dtype=torch.int64)
    # the official label scan: assistant span = after "<|im_start|>assistant\n" up to and including <|im_end|>
    im_start, im_end = 151644, 151645
    assistant = tok.tokenizer.convert_tokens_to_ids("assistant")
    ctx = torch.ones_like(ids)
    starts = [i for i in range(len(ids) - 1) if ids[i] == im_start and ids[i + 1] == assistant]
    for s in starts:  # s + 1 is the "assistant" token; training starts after it and the "\n"
        e = s + 3
        while ids[e] != im_end:
            e += 1
        ctx[s + 3:e + 1] = 0
    labels = torch.full_like(ids, -100)
    labels[:-1] = torch.where(ctx[1:] == 0, ids[1:], torch.tensor(-100))
    bs = torch.where((ids == tok.im_start) | (ids == tok.slice_start))[0] + 1
    be = torch.where((ids == tok.im_end) | (ids == tok.slice_end))[0]
    timers["tokenize+labels"] += time.process_time() - t
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels, "tgt_sizes": tgt,
            "image_bound": torch.stack([bs, be], 1)}


# --------------------------------------------------------------------------------------------------------------
# Ours, with the same stage split for the profile (the real pipeline calls preprocess_records + rows_to_table)


def ours_profiled(raws, tok: TokenizerInfo, timers: dict) -> None:
    recs = [parse_record(r, check_files=False) for r in raws]
    t = time.process_time()
    imgs = [load_rgb(next(iter(r.images.values()))) for r in recs]
    timers["decode"] += time.process_time() - t
    t = time.process_time()
    plans = [plan_slices(i.size, SPEC.max_slice_nums) for i in imgs]
    crops = [slice_image(i, p) for i, p in zip(imgs, plans)]
    timers["resize+crop"] += time.process_time() - t
    t = time.process_time()
    texts = [render_text(build_messages(r, [image_placeholder(SPEC, p.grid, 0)]), None, SPEC, tok)[0]
             for r, p in zip(recs, plans)]
    encode_texts(texts, tok)
    timers["tokenize+labels"] += time.process_time() - t
    from raytune_minicpmv.data.rows import Row
    t = time.process_time()
    table = rows_to_table([Row(id="x", source="", crops=c) for c in crops])
    timers["to-tensor+normalize+pack"] += time.process_time() - t
    t = time.process_time()
    from raytune_minicpmv.data.rows import unpack_pixels
    for raw, cs in zip(table.column("pixel_values").to_pylist(), crops):
        unpack_pixels(raw, np.array([[c.size[1] // 14, c.size[0] // 14] for c in cs]))
    timers["to-tensor+normalize+pack"] += time.process_time() - t


def run_ours(raws, tok, batch: int) -> list[dict]:
    out = []
    for i in range(0, len(raws), batch):
        table = rows_to_table(preprocess_records(raws[i:i + batch], SPEC, tok, 8192))
        b = collate_rows(table_to_numpy(table))
        for k in range(table.num_rows):
            out.append({key: b[key][k] for key in ("pixel_values", "tgt_sizes", "image_bound")}
                       | {"input_ids": torch.tensor(table.column("input_ids")[k].as_py()),
                          "labels": torch.tensor(table.column("labels")[k].as_py())})
    return out


def assert_identical(base: list[dict], ours: list[dict]) -> None:
    for b, o in zip(base, ours, strict=True):
        assert torch.equal(b["input_ids"], o["input_ids"].long()), "input_ids differ"
        assert torch.equal(b["labels"], o["labels"].long()), "labels differ"
        assert torch.equal(b["tgt_sizes"], o["tgt_sizes"]), "tgt_sizes differ"
        assert torch.equal(b["image_bound"], o["image_bound"]), "image_bound differs"
        assert len(b["pixel_values"]) == len(o["pixel_values"])
        for x, y in zip(b["pixel_values"], o["pixel_values"]):
            assert torch.equal(x, y), "pixels differ"


def timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.process_time() - c0, time.perf_counter() - w0


def ray_throughput(data: Path, n: int, cpus: int) -> float:
    """Records/s of the real Ray Data pipeline (driver checks + actors + Parquet write) on a local Ray of `cpus`."""
    import tempfile

    import ray

    from raytune_minicpmv.config import config_from_dict
    from raytune_minicpmv.data.pipeline import run_preprocess

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        ckpt.mkdir()
        for f in TOKENIZER.iterdir():
            (ckpt / f.name).symlink_to(f)
        (ckpt / "config.json").write_text(json.dumps({"query_num": 64, "slice_config": {"max_slice_nums": 9}}))
        cfg = config_from_dict({"run": {"name": "bench", "storage_path": tmp}, "ray": {"num_cpus": cpus},
                                "data": {"train_path": str(data), "model_max_length": 8192, "num_cpus_per_task": 1,
                                         "map_batch_size": 4},
                                "model": {"path": str(ckpt), "family": "minicpmv2_6"}})
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            report = run_preprocess(cfg)
        finally:
            ray.shutdown()
    return report["splits"]["train"]["records_in"] / report["splits"]["train"]["seconds"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray 1-vs-2 CPU measurement")
    ap.add_argument("--out", default="/tmp/data_throughput")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(args.out)
    data = root / "data.json"
    if not data.exists() or len(json.loads(data.read_text())) != args.records:
        make_dataset(root, args.records)
    raws = list(read_raw_records(data))
    tok = TokenizerInfo.load(TOKENIZER)
    mp = [Image.open(root / json.loads(r.text)["image"]).size for r in raws]
    print(f"{len(raws)} records, images {min(w * h for w, h in mp) / 1e6:.2f}-{max(w * h for w, h in mp) / 1e6:.2f} MP,"
          f" crops {sum(plan_slices(s, 9).num_crops for s in mp)}")

    preprocess_records(raws[:2], SPEC, tok, 8192)  # warm-up (imports, first tokenizer call)
    base_t = dict.fromkeys(["decode", "resize+crop", "to-tensor+normalize+pack", "tokenize+labels"], 0.0)
    base, base_cpu, base_wall = timed(lambda: [baseline_sample(r, tok, base_t) for r in raws])
    ours, ours_cpu, ours_wall = timed(lambda: run_ours(raws, tok, args.batch))
    assert_identical(base, ours)
    ours_t = dict.fromkeys(base_t, 0.0)
    for i in range(0, len(raws), args.batch):
        ours_profiled(raws[i:i + args.batch], tok, ours_t)

    n = len(raws)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python "
          f"{platform.python_version()}, torch {torch.__version__}, Pillow {Image.__version__}, numpy {np.__version__}")
    print("outputs identical: input_ids, labels, image_bound, tgt_sizes, float32 pixels (all records)\n")
    print(f"| path | records/s per core (CPU time) | CPU s | wall s |")
    print(f"|---|---|---|---|")
    print(f"| baseline (per sample, torch ops, apply_chat_template) | {n / base_cpu:.2f} | {base_cpu:.2f} | "
          f"{base_wall:.2f} |")
    print(f"| ours (batched, uint8 pack, one tokenizer call; + collate normalize) | {n / ours_cpu:.2f} | "
          f"{ours_cpu:.2f} | {ours_wall:.2f} |")
    print(f"\nspeed-up per core: {base_cpu / ours_cpu:.2f}x\n")
    print("| stage (CPU s for all records) | baseline | ours |")
    print("|---|---|---|")
    for k in base_t:
        print(f"| {k} | {base_t[k]:.2f} | {ours_t[k]:.2f} |")
    if not args.no_ray:
        print("\n| Ray Data pipeline (run_preprocess, Parquet write included) | records/s |")
        print("|---|---|")
        for cpus in (1, 2):
            print(f"| local Ray, num_cpus={cpus} | {ray_throughput(data, n, cpus):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
