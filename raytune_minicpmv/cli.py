"""The command line: parse, load the config, call one library entry function. Nothing else lives here.

    raytune-minicpmv preprocess --config configs/demo.yaml [key.path=value ...]
    raytune-minicpmv train      --config configs/minicpmv26_lora.yaml [overrides]
    raytune-minicpmv tune       --config configs/minicpmv26_tune.yaml [overrides]
    raytune-minicpmv merge      --base CKPT --adapter ADAPTER_DIR --out OUT [--dtype bf16]
    raytune-minicpmv submit     [--address URL] [--follow] -- <raytune-minicpmv command ...>
    raytune-minicpmv status|logs|stop JOB_ID [--address URL]
    raytune-minicpmv demo       [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .config import ConfigError, load_config
from .interrupts import Interrupted


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.max_steps=100")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raytune-minicpmv", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [("preprocess", "run the Ray Data pipeline and write Parquet shards + a report"),
                        ("train", "one training run (Ray Train + DeepSpeed)"),
                        ("tune", "learning-rate search with ASHA, then merge the best trial"),
                        ("validate", "load and validate a config, print it resolved")]:
        _add_config_args(sub.add_parser(name, help=help_))
    m = sub.add_parser("merge", help="merge a LoRA adapter (+ fully trained modules) into a base checkpoint")
    m.add_argument("--base", required=True)
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--config", "-c", default=None, help="optional config for merge.* settings")
    m.add_argument("overrides", nargs="*")
    s = sub.add_parser("submit", help="submit a command as a Ray Job")
    s.add_argument("--address", default=None, help="Ray dashboard address (default: RAY_ADDRESS or 127.0.0.1:8265)")
    s.add_argument("--follow", action="store_true", help="stream logs until the job ends")
    s.add_argument("--working-dir", default=".", help="uploaded as the job's working dir")
    s.add_argument("--submission-id", default=None)
    s.add_argument("--env", action="append", default=[], help="KEY=VALUE for the job's environment")
    s.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- raytune-minicpmv tune --config ...")
    for name in ("status", "logs", "stop"):
        j = sub.add_parser(name, help=f"{name} of a submitted job")
        j.add_argument("job_id")
        j.add_argument("--address", default=None)
        if name == "logs":
            j.add_argument("--follow", action="store_true")
    d = sub.add_parser("demo", help="the whole chain on a tiny model, sample data and a local Ray (CPU)")
    d.add_argument("--out", default="demo_out")
    d.add_argument("overrides", nargs="*")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # Ctrl-C / SIGTERM: the run stopped cleanly and can be resumed
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def _dispatch(args) -> int:
    cmd = args.command
    if cmd == "validate":
        cfg = load_config(args.config, args.overrides)
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if cmd == "preprocess":
        from .pipeline import run_preprocess

        run_preprocess(load_config(args.config, args.overrides))
        return 0
    if cmd == "train":
        from .train import run_train

        run_train(load_config(args.config, args.overrides))
        return 0
    if cmd == "tune":
        from .tune import run_tune

        run_tune(load_config(args.config, args.overrides))
        return 0
    if cmd == "merge":
        from .merge import run_merge

        cfg = load_config(args.config, args.overrides, check_paths=False)
        run_merge(args.base, args.adapter, args.out, cfg.merge)
        return 0
    if cmd in ("submit", "status", "logs", "stop"):
        from . import jobs

        return jobs.cli(args)
    if cmd == "demo":
        from .demo import run_demo

        run_demo(args.out, args.overrides)
        return 0
    raise AssertionError(cmd)


if __name__ == "__main__":
    sys.exit(main())
