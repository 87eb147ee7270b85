"""What the command line prints (issue 10 items 15 and 16): help for every flag, no documented flag that does not
exist, a readable Tune plot, and Ray's own chatter kept out of the default output.

Run: .venv/bin/python -m pytest tests/unit/test_cli_output.py -q
     (test_quiet_ray_workers starts a local Ray: run it through the shared lock)
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from raytune_minicpmv.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "cluster.yaml",
        *sorted((ROOT / "configs").glob("*.yaml")), ROOT / "raytune_minicpmv" / "cli.py"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_and_argument_has_help():
    parser = build_parser()
    for name, sub in {"<top>": parser, **_subparsers(parser)}.items():
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"{name}: {action.option_strings or action.dest}"


def test_every_documented_flag_exists():
    """`raytune-minicpmv merge ... --dtype bf16` was documented but not accepted; every flag the docs show must parse."""
    parser = build_parser()
    subs = _subparsers(parser)
    top = {s for a in parser._actions for s in a.option_strings}
    checked = 0
    for doc in DOCS:
        for m in re.finditer(r"raytune-minicpmv ([a-z|]+)([^\n`]*)", doc.read_text()):
            rest = m[2].split(" -- ")[0].split(" #")[0]  # submit's entrypoint is another command; comments
            # `status JOB_ID | logs JOB_ID --follow | stop JOB_ID`: later pieces start with their own command
            pieces = [(m[1].split("|"), rest.split(" | ")[0])]
            pieces += [([p.split()[0]], p) for p in rest.split(" | ")[1:] if p.split()]
            for cmds, text in pieces:
                for cmd in cmds:
                    if cmd not in subs:
                        continue
                    known = top | {s for a in subs[cmd]._actions for s in a.option_strings}
                    for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", text):
                        assert flag in known, f"{doc.name}: `raytune-minicpmv {cmd} ... {flag}` does not exist"
                        checked += 1
    assert checked > 10


def test_merge_dtype_flag_sets_the_merge_dtype():
    args = build_parser().parse_args(["merge", "--base", "b", "--adapter", "a", "--out", "o", "--dtype", "fp32"])
    assert args.dtype == "fp32"


def test_the_quiet_ray_data_config_is_rays_default_with_a_quieter_console():
    from ray.data._internal.logging import DEFAULT_CONFIG

    from raytune_minicpmv.cluster.log_control import RAY_DATA_QUIET_CONFIG

    ours = yaml.safe_load(RAY_DATA_QUIET_CONFIG.read_text())
    assert ours["handlers"]["console"]["level"] == "WARNING"
    ours["handlers"]["console"]["level"] = DEFAULT_CONFIG["handlers"]["console"]["level"]
    assert ours["handlers"]["console"]["filters"].pop() == "drop_notices"
    assert ours["filters"].pop("drop_notices") == {"()": "raytune_minicpmv.cluster.log_control.DropRayDataNotices"}
    assert ours == DEFAULT_CONFIG, "Ray Data's default logging config changed: regenerate ray_data_logging_quiet.yaml"


def test_tune_plot_marks_the_winner_and_matches_points_to_the_legend(tmp_path):
    from raytune_minicpmv.config import load_config
    from raytune_minicpmv.tune.selection import TrialRecord
    from raytune_minicpmv.tune.report import build_figure, plot, trial_rows

    cfg = load_config(None, ["scaling.use_gpu=false"], check_paths=False)
    trials = [TrialRecord("trial_driver_abc_00000", {"lr": 1e-4}, [{"step": 10, "eval_loss": 2.0},
                                                                   {"step": 20, "eval_loss": 1.5}], "finished", None, 5),
              TrialRecord("trial_driver_abc_00001", {"lr": 1e-2}, [{"step": 10, "eval_loss": 3.0}], "stopped", None, 2),
              TrialRecord("trial_driver_abc_00002", {"lr": 1e-3}, [{"step": 10, "eval_loss": 1.8},
                                                                   {"step": 20, "eval_loss": 1.2}], "finished", None, 5)]
    rows = trial_rows(trials, cfg)
    fig = build_figure(trials, rows, "eval_loss", best_id="trial_driver_abc_00002")
    curves, scatter = fig.axes
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[2].startswith("abc_00002  lr=0.001") and "best" in labels[2]
    assert sum("best" in label for label in labels) == 1 and "stopped" in labels[1]
    # each trial's point on the right has the colour of its curve on the left and of its legend entry
    line_colours = [line.get_color() for line in curves.get_lines()]
    point_colours = [tuple(c.get_facecolor()[0]) for c in scatter.collections]
    legend_colours = [h.get_color() for h in legend.legend_handles]
    import matplotlib.colors as mc

    assert [mc.to_rgba(c) for c in line_colours] == [mc.to_rgba(c) for c in legend_colours]
    assert point_colours == [mc.to_rgba(c) for c in legend_colours]
    # the winner is a star in both panels, at its best point
    stars = [c for c in scatter.collections if c.get_sizes()[0] > 100]
    assert len(stars) == 1 and tuple(stars[0].get_offsets()[0]) == (1e-3, 1.2)
    assert any(tuple(c.get_offsets()[0]) == (20, 1.2) for c in curves.collections)
    assert scatter.get_xscale() == "log" and "learning rate" in scatter.get_xlabel()
    fig.canvas.draw()  # tick labels exist once drawn: compact, no overlapping mathtext minor labels
    ticks = [t.get_text() for t in scatter.get_xticklabels(minor=False) if t.get_text()]
    assert ticks and all(re.fullmatch(r"\de-\d\d", t) for t in ticks), ticks
    assert not [t.get_text() for t in scatter.get_xticklabels(minor=True) if t.get_text()]
    assert curves.get_xlabel() == "optimizer step" and curves.get_ylabel() == "eval_loss"
    plot(trials, rows, "eval_loss", str(tmp_path / "p.png"), best_id="trial_driver_abc_00002")
    assert (tmp_path / "p.png").stat().st_size > 10_000


QUIET_SCRIPT = textwrap.dedent('''
    import sys, warnings
    from raytune_minicpmv.cluster import log_control
    log_control.configure(sys.argv[1])
    from raytune_minicpmv.cluster.ray_session import init_ray
    from raytune_minicpmv.config import load_config
    ray = init_ray(load_config(None, ["ray.num_cpus=2", "scaling.use_gpu=false", "ray.include_dashboard=false"],
                               check_paths=False))
    import ray.data

    def same(batch):
        return batch

    @ray.remote(num_cpus=0.1)
    def work():  # what a trial driver or preprocessing driver does: warnings, Ray Data without progress bars
        warnings.warn("deprecated thing", FutureWarning)
        ray.data.DataContext.get_current().enable_progress_bars = False  # as pipeline.py does for re-reads
        print("OUR-PROGRESS-LINE", flush=True)
        return ray.data.range(8).map_batches(same).count()

    print(ray.get(work.remote()))
    ray.shutdown()
''')


@pytest.mark.slow
def test_quiet_ray_workers(tmp_path):
    """A Ray task's FutureWarning, Ray Data's execution plans and progress notice and the driver's token-auth notice
    stay out of the default output; our own worker print arrives; --log-level DEBUG shows them (so the test sees
    them when they are there). Ray Train's own lines are filtered by its LoggingConfig (train.py), measured in the
    demo's line count."""
    script = tmp_path / "quiet.py"
    script.write_text(QUIET_SCRIPT)
    outs = {}
    # a token or auth mode left in os.environ by an earlier in-process Ray would silence the token notice itself
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    for level in ("INFO", "DEBUG"):
        run = subprocess.run([sys.executable, str(script), level], capture_output=True, text=True, timeout=300,
                             env={**env, "RAY_DEDUP_LOGS": "0"})
        assert run.returncode == 0, run.stderr[-3000:]
        outs[level] = run.stdout + run.stderr
    for noise in ("FutureWarning", "Execution plan of Dataset", "Progress bars disabled", "Token authentication"):
        assert noise not in outs["INFO"], noise
        assert noise in outs["DEBUG"], noise  # the test can see it when it is there
    assert "OUR-PROGRESS-LINE" in outs["INFO"] and "\n8\n" in outs["INFO"]
    assert "ray.include_dashboard=false" in outs["INFO"]  # said once instead of the cleaner's repeated warning


def test_debug_drops_a_quiet_ray_data_config_inherited_from_a_quiet_run(monkeypatch):
    """A DEBUG command started from a quiet one's environment (or after one in the same process) shows Ray Data."""
    from raytune_minicpmv.cluster import log_control

    monkeypatch.setenv("RAY_DATA_LOGGING_CONFIG", str(log_control.RAY_DATA_QUIET_CONFIG))
    monkeypatch.setenv(log_control.LEVEL_ENV, "INFO")
    log_control.configure("DEBUG")
    assert "RAY_DATA_LOGGING_CONFIG" not in os.environ
    log_control.configure("INFO")
    assert os.environ["RAY_DATA_LOGGING_CONFIG"] == str(log_control.RAY_DATA_QUIET_CONFIG)
