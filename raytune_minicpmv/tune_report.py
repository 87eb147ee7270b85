"""The end-of-search report: a results table, `tune_results.png` and `report.md` in the experiment directory.

The table has one row per trial: trial id, learning rate, best eval metric (and the step it was reached at),
steps run, how the trial ended (finished / stopped by ASHA / error) and device-seconds (GPU-seconds on a GPU
cluster: wall time × workers; worker-seconds on CPU).
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from .config import Config, is_uri, join_uri

if TYPE_CHECKING:
    from .tune import BestTrial, TrialRecord


def trial_rows(trials: "list[TrialRecord]", cfg: Config) -> list[dict]:
    metric, sign = cfg.tune.metric, (1 if cfg.tune.mode == "min" else -1)
    rows = []
    for t in trials:
        evals = [(r[metric], int(r.get("step", 0))) for r in t.history if r.get(metric) is not None]
        best = min(evals, key=lambda e: sign * e[0]) if evals else (float("nan"), 0)
        steps = max((int(r.get("step", 0)) for r in t.history), default=0)
        rows.append({"trial": t.trial_id, "lr": t.config.get("lr"), "best": best[0], "best_step": best[1],
                     "steps": steps, "evals": len(evals), "ended": t.status,
                     "device_s": t.time_s * cfg.scaling.num_workers, **{k: v for k, v in t.config.items() if k != "lr"}})
    return rows


def format_table(rows: list[dict], metric: str, device: str) -> str:
    extra = sorted({k for r in rows for k in r} - {"trial", "lr", "best", "best_step", "steps", "evals", "ended",
                                                   "device_s"})
    head = ["trial", "lr", *extra, f"best {metric}", "at step", "steps", "ended", f"{device}-s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["best"] != r["best"], r["best"])):
        cells = [r["trial"], f"{r['lr']:.3g}" if r["lr"] is not None else "-", *[str(r.get(k, "")) for k in extra],
                 f"{r['best']:.4f}", str(r["best_step"]), str(r["steps"]), r["ended"], f"{r['device_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(trials: "list[TrialRecord]", rows: list[dict], metric: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for t in trials:
        pts = [(int(r.get("step", 0)), r[metric]) for r in t.history if r.get(metric) is not None]
        if pts:
            lr = t.config.get("lr")
            a.plot(*zip(*pts), marker="o", label=f"{t.trial_id} lr={lr:.2g}" if lr else t.trial_id,
                   linestyle="-" if t.status == "finished" else "--")
    a.set_xlabel("step")
    a.set_ylabel(metric)
    a.set_title(f"{metric} per trial (dashed: stopped early)")
    a.legend(fontsize=7)
    pts = [(r["lr"], r["best"]) for r in rows if r["lr"] is not None and r["best"] == r["best"]]
    if pts:
        b.scatter(*zip(*pts))
        b.set_xscale("log")
    b.set_xlabel("learning rate")
    b.set_ylabel(f"best {metric}")
    b.set_title(f"best {metric} vs learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tune_report(exp_dir: str, trials: "list[TrialRecord]", best: "BestTrial", cfg: Config,
                      elapsed_s: float) -> dict:
    """Print the table and write report.md, results.json and tune_results.png under exp_dir (local or shared FS)."""
    device = "GPU" if cfg.scaling.use_gpu else "worker"
    rows = trial_rows(trials, cfg)
    table = format_table(rows, cfg.tune.metric, device)
    counts = {s: sum(r["ended"] == s for r in rows) for s in ("finished", "stopped", "error")}
    total_steps = sum(r["steps"] for r in rows)
    summary = {"experiment": exp_dir, "best_trial": best.trial_id, "best_metric": best.metric,
               "best_step": best.step, "best_config": best.config, "best_checkpoint": best.checkpoint_path,
               "trials": len(rows), **counts, "total_steps": total_steps, "wall_s": round(elapsed_s, 1),
               "rows": rows}
    print(table)
    print(f"{len(rows)} trials ({counts['finished']} finished, {counts['stopped']} stopped by ASHA, "
          f"{counts['error']} errors), {total_steps} steps, {elapsed_s:.0f}s")
    if is_uri(exp_dir):
        return summary  # object storage: the Tune experiment state is there; the local report is printed only
    os.makedirs(exp_dir, exist_ok=True)
    plot(trials, rows, cfg.tune.metric, join_uri(exp_dir, "tune_results.png"))
    with open(join_uri(exp_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    md = [f"# Tune report: {cfg.run.name}", "",
          f"Best trial **{best.trial_id}**: {cfg.tune.metric} = {best.metric:.4f} at step {best.step}, "
          f"config {json.dumps(best.config)}.", "", f"Best checkpoint: `{best.checkpoint_path}`", "",
          table, "", f"{summary['trials']} trials: {counts['finished']} finished, {counts['stopped']} stopped by "
          f"ASHA, {counts['error']} errors; {total_steps} training steps in total; wall {elapsed_s:.0f} s.", "",
          "![tune results](tune_results.png)", ""]
    with open(join_uri(exp_dir, "report.md"), "w") as f:
        f.write("\n".join(md))
    return summary
