"""The end-of-search report: a results table, `tune_results.png` and `report.md` in the experiment directory.

The table has one row per trial: trial id, learning rate, best eval metric (and the step it was reached at),
steps run, how the trial ended (finished / stopped by ASHA / error) and device-seconds (GPU-seconds on a GPU
cluster: wall time × workers; worker-seconds on CPU).
"""
from __future__ import annotations

import json
import os

from ..config import Config, is_uri, join_uri
from .selection import BestTrial, TrialRecord


def trial_rows(trials: list[TrialRecord], cfg: Config) -> list[dict]:
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


def short_id(trial_id: str) -> str:
    """`trial_driver_563b1_00002` → `563b1_00002` (what Tune's own status lines print)."""
    return trial_id.split("_", 2)[-1] if trial_id.startswith("trial_driver_") else trial_id


def build_figure(trials: list[TrialRecord], rows: list[dict], metric: str, best_id: str | None):
    """Left: `metric` per evaluation step, one colour per trial (dashed: stopped early). Right: each trial's best
    `metric` against its learning rate, in the same colour as its curve. The winning trial is a star in both panels
    and named in the legend; one legend (below) serves both panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5.2))
    colours = plt.get_cmap("tab10" if len(trials) <= 10 else "tab20")
    best_of = {r["trial"]: r for r in rows}
    handles = []
    for i, t in enumerate(trials):
        colour = colours(i % colours.N)
        pts = [(int(r.get("step", 0)), r[metric]) for r in t.history if r.get(metric) is not None]
        lr = t.config.get("lr")
        won = t.trial_id == best_id
        label = f"{short_id(t.trial_id)}  lr={lr:.2g}" if lr else short_id(t.trial_id)
        label += f"  ({t.status})" + ("  ★ best" if won else "")
        style = "-" if t.status == "finished" else "--"
        if pts:
            a.plot(*zip(*pts), color=colour, linestyle=style, marker="o", markersize=4, linewidth=2.5 if won else 1.5)
        row = best_of.get(t.trial_id)
        if row and lr and row["best"] == row["best"]:
            b.scatter([lr], [row["best"]], color=colour, s=220 if won else 60, marker="*" if won else "o",
                      edgecolors="black" if won else "none", zorder=3)
            if won:
                a.scatter([row["best_step"]], [row["best"]], color=colour, s=220, marker="*", edgecolors="black",
                          zorder=3)
        handles.append(Line2D([], [], color=colour, linestyle=style, marker="*" if won else "o",
                              markersize=12 if won else 6, label=label))
    a.set_xlabel("optimizer step")
    a.set_ylabel(metric)
    a.set_title(f"{metric} at each evaluation")
    b.set_xscale("log")
    # ticks at 1, 2 and 5 × 10^k as "2e-04": matplotlib's default labels every minor tick of a short log range in
    # mathtext, which overlap
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    b.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    b.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}"))
    b.xaxis.set_minor_formatter(NullFormatter())
    b.set_xlabel("learning rate (log scale)")
    b.set_ylabel(f"best {metric} of the trial")
    b.set_title(f"best {metric} vs learning rate")
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=10)
        ax.xaxis.label.set_size(11)
        ax.yaxis.label.set_size(11)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 3), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.05 * ((len(handles) - 1) // 3 + 1), 1, 1))
    return fig


def plot(trials: list[TrialRecord], rows: list[dict], metric: str, path: str, best_id: str | None = None) -> None:
    import matplotlib.pyplot as plt

    fig = build_figure(trials, rows, metric, best_id)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tune_report(exp_dir: str, trials: list[TrialRecord], best: BestTrial, cfg: Config,
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
    plot(trials, rows, cfg.tune.metric, join_uri(exp_dir, "tune_results.png"), best_id=best.trial_id)
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


def trial_progress_callback(metric: str, full_reports: int):
    """A Tune callback printing one line when a trial starts and one when it ends. It replaces Tune's own console
    output below --log-level DEBUG (`log_control.tune_verbosity`), whose per-trial result tables made up most of a
    demo's output; the step lines come from the workers, the full table at the end from `write_tune_report`."""
    from ray.tune import Callback

    class TrialProgress(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items())
            print(f"trial {short_id(trial.trial_id)} started: {params}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            reports = int(last.get("training_iteration", 0))
            how = "finished" if reports >= full_reports else "stopped early by ASHA"
            value = last.get(metric)
            shown = f"{metric}={value:.4f}" if isinstance(value, (int, float)) else f"no {metric}"
            print(f"trial {short_id(trial.trial_id)} {how} after {reports} evaluation(s): last {shown} at step "
                  f"{last.get('step', '?')}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"trial {short_id(trial.trial_id)} failed; its error is in {trial.local_path}", flush=True)

    return TrialProgress()
