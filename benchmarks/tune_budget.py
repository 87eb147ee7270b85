"""ASHA vs the full grid over the same learning rates, on the tiny model (CPU, local Ray).

    .venv/bin/python benchmarks/tune_budget.py [--lrs 1e-6,1e-5,...] [--order shuffled|ascending] [--max-steps 27]

Both searches use the same preprocessed data, model, seed and learning-rate grid (one trial per lr, run one at a
time, in the same order). The full grid trains every lr for max_steps; ASHA (grace 1 evaluation, reduction factor 3)
stops the laggards at its rungs. Printed: best lr and its eval loss, total training steps and wall time of each, and
ASHA's fractions of the grid's. Goal: the same best lr, and ASHA's steps ≤ 30 % of the grid's. Wall time also carries
each trial's fixed start-up cost (Ray Train workers importing torch/transformers/DeepSpeed), which ASHA cannot save.

With trials run one at a time, asynchronous successive halving can stop a trial only against the trials before it,
so the trial ORDER decides most of the saving (ascending learning rates are its worst case here: every trial beats
all earlier ones). The script therefore also replays ASHA's rule (Ray's `_Bracket`: rungs at grace·rf^k, stop below
the (1 − 1/rf) percentile of the rung) on the grid's recorded eval curves for many random orders, and prints the
mean / median / p90 step fraction and how often the replay finds the grid's best lr.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raytune_minicpmv.config import load_config, replace  # noqa: E402
from raytune_minicpmv.demo import DEMO_CONFIG, prepare_demo_inputs  # noqa: E402


def run_search(cfg, name: str, scheduler: str) -> dict:
    from raytune_minicpmv.tune.search import run_tune

    t0 = time.time()
    summary = run_tune(replace(cfg, run={"name": name}, tune={"scheduler": scheduler}))
    wall = time.time() - t0
    best_lr = summary["best_config"]["lr"]
    return {"search": scheduler, "best_lr": best_lr, "best_eval_loss": summary["best_metric"],
            "total_steps": summary["total_steps"], "wall_s": wall, "stopped": summary["stopped"]}


def grid_curves(exp_dir: str) -> dict[float, list[float]]:
    """lr -> eval_loss per evaluation, from a finished Tune experiment's trial dirs."""
    curves = {}
    for d in glob.glob(os.path.join(exp_dir, "trial_driver_*")):
        lr = json.load(open(os.path.join(d, "params.json")))["lr"]
        rows = [json.loads(line) for line in open(os.path.join(d, "result.json")) if line.strip()]
        curves[lr] = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return curves


def replay_asha(curves: dict, order: list, grace: int, rf: int) -> tuple[float, float]:
    """Sequential ASHA on recorded curves (Ray's rule). Returns (fraction of the grid's evaluations, best lr)."""
    import numpy as np

    max_t = min(len(c) for c in curves.values())
    rungs = [(grace * rf ** k, {}) for k in reversed(range(int(math.log(max_t / grace) / math.log(rf) + 1)))]
    used, best = 0, {}
    for lr in order:
        for t in range(1, max_t + 1):
            reward = -curves[lr][t - 1]
            best[lr] = max(best.get(lr, -math.inf), reward)
            stop = False
            for milestone, recorded in rungs:
                if t < milestone or lr in recorded:
                    continue
                if recorded:
                    stop = reward < np.nanpercentile(list(recorded.values()), (1 - 1 / rf) * 100)
                recorded[lr] = reward
                break
            if stop or t == max_t:
                break
        used += t
    return used / (len(order) * max_t), max(best, key=best.get)


def replay_table(curves: dict, grace: int, rf: int, orders: int = 3000) -> str:
    import numpy as np

    grid_best = min(curves, key=lambda k: min(curves[k]))
    rng = random.Random(0)
    fracs, same = [], 0
    for _ in range(orders):
        order = list(curves)
        rng.shuffle(order)
        frac, best = replay_asha(curves, order, grace, rf)
        fracs.append(frac)
        same += best == grid_best
    asc = replay_asha(curves, sorted(curves), grace, rf)[0]
    return (f"replay over {orders} random orders (grace {grace}, rf {rf}): ASHA steps / grid steps mean "
            f"{np.mean(fracs):.1%}, median {np.median(fracs):.1%}, p90 {np.percentile(fracs, 90):.1%}; "
            f"same best lr in {same / orders:.1%}; ascending order {asc:.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lrs", default="1e-6,1e-5,1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1")
    ap.add_argument("--max-steps", type=int, default=27)
    ap.add_argument("--eval-steps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--order", choices=["shuffled", "ascending"], default="shuffled",
                    help="trial order (the same for both searches); shuffled uses a fixed seed")
    ap.add_argument("--out", default=None, help="work dir (default: a temp dir)")
    args = ap.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="tune_budget_"))
    lrs = sorted(float(x) for x in args.lrs.split(","))
    if args.order == "shuffled":
        random.Random(0).shuffle(lrs)
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
    print(replay_table(grid_curves(str(out / "runs" / "grid-tune")), grace=1, rf=3))


if __name__ == "__main__":
    main()
