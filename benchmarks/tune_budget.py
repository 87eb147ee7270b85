"""ASHA vs the full grid over the same learning rates, on the tiny model (CPU, local Ray).

    .venv/bin/python benchmarks/tune_budget.py [--lrs 1e-5,3e-5,...] [--max-steps 24] [--eval-steps 3]

Both searches use the same preprocessed data, model, seed and learning-rate grid (one trial per lr, run one at a
time). The full grid trains every lr for max_steps; ASHA (grace 1 evaluation, reduction factor 3) stops the
laggards at its rungs. Printed: best lr and its eval loss, total training steps and wall time of each, and ASHA's
fractions of the grid's. Goal: the same best lr, and ASHA's steps ≤ 30 % of the grid's. Wall time also carries each
trial's fixed start-up cost (Ray Train workers importing torch/transformers/DeepSpeed), which ASHA cannot save.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raytune_minicpmv.config import load_config, replace  # noqa: E402
from raytune_minicpmv.demo import DEMO_CONFIG, prepare_demo_inputs  # noqa: E402


def run_search(cfg, name: str, scheduler: str) -> dict:
    from raytune_minicpmv.tune import run_tune

    t0 = time.time()
    summary = run_tune(replace(cfg, run={"name": name}, tune={"scheduler": scheduler}))
    wall = time.time() - t0
    best_lr = summary["best_config"]["lr"]
    return {"search": scheduler, "best_lr": best_lr, "best_eval_loss": summary["best_metric"],
            "total_steps": summary["total_steps"], "wall_s": wall, "stopped": summary["stopped"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lrs", default="1e-6,1e-5,1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1")
    ap.add_argument("--max-steps", type=int, default=27)
    ap.add_argument("--eval-steps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default=None, help="work dir (default: a temp dir)")
    args = ap.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="tune_budget_"))
    lrs = [float(x) for x in args.lrs.split(",")]
    overrides = [f"{k}={v}" for k, v in prepare_demo_inputs(out).items()] + [
        f"train.max_steps={args.max_steps}", f"train.eval_steps={args.eval_steps}", f"scaling.num_workers={args.workers}",
        f"tune.search.lr={lrs}", "tune.search.lr_sampler=grid", "tune.num_samples=1", "tune.max_concurrent_trials=1",
        "tune.grace_period=1", "tune.reduction_factor=3", "tune.max_t=null", "merge.enabled=false",
        f"data.output_path={out / 'preprocessed'}"]  # both searches read the same preprocessed Parquet
    cfg = load_config(DEMO_CONFIG, overrides)
    rows = [run_search(cfg, "asha", "asha"), run_search(cfg, "grid", "none")]
    asha, grid = rows
    print(f"\nlearning rates: {lrs}; max_steps {args.max_steps}, eval every {args.eval_steps}, "
          f"{args.workers} worker(s), {os.cpu_count()} CPUs")
    print("| search | best lr | best eval loss | total steps | wall s | trials stopped early |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['search']} | {r['best_lr']:.3g} | {r['best_eval_loss']:.4f} | {r['total_steps']} | "
              f"{r['wall_s']:.0f} | {r['stopped']} |")
    print(f"\nsame best lr: {asha['best_lr'] == grid['best_lr']}; ASHA steps / grid steps = "
          f"{asha['total_steps'] / grid['total_steps']:.1%}; ASHA wall / grid wall = {asha['wall_s'] / grid['wall_s']:.1%}")


if __name__ == "__main__":
    main()
