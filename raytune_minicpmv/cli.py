"""The command line: parse, load the config, call one library entry function. Nothing else lives here.

    raytune-minicpmv preprocess --config configs/demo.yaml [key.path=value ...]
    raytune-minicpmv train      --config configs/minicpmv26_lora.yaml [--profile] [overrides]
    raytune-minicpmv tune       --config configs/minicpmv26_tune.yaml [overrides]
    raytune-minicpmv validate   --config CONFIG [overrides]
    raytune-minicpmv merge      --base CKPT --adapter ADAPTER_DIR --out OUT [--dtype bf16]
    raytune-minicpmv chat       --model CKPT [--adapter DIR] [--image PATH ...] ["question"]   (none: interactive)
    raytune-minicpmv predict    --config CONFIG --model CKPT --data records.json --out preds.jsonl [--actors N]
    raytune-minicpmv submit     [--address URL] [--follow] [--dry-run] -- <raytune-minicpmv command ...>
    raytune-minicpmv status|logs|stop JOB_ID [--address URL]
    raytune-minicpmv demo       [--out DIR]
    raytune-minicpmv configs    [ls | cp NAME DEST]

Every command takes --log-level (DEBUG shows Ray's own output too) and --debug (tracebacks for user errors).
Relative paths in a config file resolve against the file's directory; relative paths in overrides against the
current directory.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .config import ConfigError, load_config
from .cluster.interrupts import Interrupted
from .cluster.log_control import LEVELS

log = logging.getLogger(__name__)


def _common(top: bool = False) -> argparse.ArgumentParser:
    """--log-level / --debug, accepted before or after the command name (the command's copy has no default, so it
    does not reset a value given before the command; a fresh parser each time, as `parents` shares actions)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--log-level", type=str.upper, choices=LEVELS, default="INFO" if top else argparse.SUPPRESS,
                   help="INFO (default): our progress, and warnings/errors of Ray and the libraries; DEBUG: "
                        "everything Ray prints too (Ray Data plans, Tune result tables); WARNING, ERROR: less")
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="print the full traceback of a user error (bad config, bad data, unreachable cluster)")
    return p


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="YAML config (`raytune-minicpmv configs ls` lists recipes)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="dotted overrides with YAML values, e.g. optim.lr=3e-4 train.max_steps=100; relative "
                        "paths resolve against the current directory")


def build_parser() -> argparse.ArgumentParser:
    description = "Fine-tune MiniCPM-V vision-language models on Ray (docs: README.md, docs/).\n" + \
        __doc__.split("\n", 1)[1]  # the usage lines, without the module's own first line
    parser = argparse.ArgumentParser(prog="raytune-minicpmv", description=description, parents=[_common(top=True)],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = _common()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_ in [("preprocess", "run the Ray Data pipeline and write Parquet shards + a report"),
                        ("train", "one training run (Ray Train + DeepSpeed)"),
                        ("tune", "learning-rate search with ASHA, then merge the best trial"),
                        ("validate", "check a config and its paths (no Ray), print it resolved")]:
        sp = sub.add_parser(name, help=help_, description=help_, parents=[common])
        _add_config_args(sp)
        if name == "train":
            sp.add_argument("--profile", action="store_true",
                            help="torch-profile 5 steps (train.profile_steps=N for another count): a trace file, "
                                 "the top kernels and the GPU idle %%")
    m = sub.add_parser("merge", parents=[common], help="merge a LoRA adapter (+ fully trained modules) into a base "
                       "checkpoint", description="merge a LoRA adapter into a base checkpoint (a Ray task)")
    m.add_argument("--base", required=True, help="base checkpoint directory (config.json + safetensors)")
    m.add_argument("--adapter", required=True, help="adapter directory: a checkpoint's adapter/ (or the checkpoint "
                                                    "dir), a PEFT adapter, or an official-script output")
    m.add_argument("--out", required=True, help="output directory of the merged checkpoint (published atomically)")
    m.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="dtype of the merged weights (default: merge.dtype of --config, else bf16)")
    m.add_argument("--config", "-c", default=None, help="optional config for merge.* and ray.* settings")
    m.add_argument("overrides", nargs="*", metavar="key.path=value", help="overrides of that config, e.g. "
                                                                         "merge.verify_samples=0")
    _add_infer_parsers(sub, common)
    s = sub.add_parser("submit", parents=[common], help="submit a command as a Ray Job",
                       description="submit a command as a Ray Job (uploads --working-dir minus secrets, data, "
                                   "checkpoints and .gitignore'd files; see docs/CLUSTER.md)")
    s.add_argument("--address", default=None, help="Ray dashboard address (default: RAY_API_SERVER_ADDRESS, an "
                                                   "http(s) RAY_ADDRESS, else http://127.0.0.1:8265); wins over both")
    s.add_argument("--follow", action="store_true", help="stream logs until the job ends (exit 0 if it SUCCEEDED)")
    s.add_argument("--working-dir", default=".", help="uploaded as the job's working dir (default: .)")
    s.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="one more gitignore-style pattern not to upload (repeatable; '!PATTERN' re-includes a file)")
    s.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded and exit")
    s.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks raysubmit_...)")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job on every node (repeatable)")
    s.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- raytune-minicpmv tune --config ...")
    for name in ("status", "logs", "stop"):
        j = sub.add_parser(name, parents=[common], help=f"{name} of a submitted job")
        j.add_argument("job_id", help="the id `submit` printed (raysubmit_...)")
        j.add_argument("--address", default=None, help="Ray dashboard address (as for submit)")
        if name == "logs":
            j.add_argument("--follow", action="store_true", help="stream until the job ends (exit 0 if it SUCCEEDED)")
    d = sub.add_parser("demo", parents=[common], help="the whole chain on a tiny model, sample data and a local Ray "
                                                      "(CPU)")
    d.add_argument("--out", default="demo_out", help="output directory (default: demo_out); a rerun resumes there")
    d.add_argument("overrides", nargs="*", metavar="key.path=value", help="overrides of the demo recipe")
    c = sub.add_parser("configs", parents=[common], help="list or copy the shipped recipes",
                       description="list (ls) or copy (cp NAME DEST) the recipes shipped with the package")
    c.add_argument("action", nargs="?", choices=("ls", "cp"), default="ls", help="ls (default) or cp")
    c.add_argument("name", nargs="?", help="cp: recipe name, e.g. minicpmv26_lora (or .yaml)")
    c.add_argument("dest", nargs="?", help="cp: destination file or directory")
    c.add_argument("--force", action="store_true", help="cp: overwrite an existing file")
    return parser


def _add_infer_parsers(sub, common) -> None:
    ch = sub.add_parser("chat", parents=[common], help="ask a (fine-tuned) model about images; streams the answer",
                        description="ask a model about images (the training preprocessing; answers streamed). "
                                    "Without a question: an interactive session on a terminal, else stdin is read")
    pr = sub.add_parser("predict", parents=[common], help="batch generation over a records file (Ray Data actors)",
                        description="generate an answer for every record of --data into --out (JSON lines: id, "
                                    "output, reference); a rerun skips the ids already done (docs/INFERENCE.md)")
    for p in (ch, pr):
        p.add_argument("--model", default=None, help="checkpoint directory (a base, a merged model)"
                       + ("" if p is ch else "; default: model.path of --config"), required=p is ch)
        p.add_argument("--adapter", default=None, help="a training checkpoint dir (its adapter/ or full_model/) or "
                                                       "a PEFT adapter dir, applied to --model")
    ch.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeatable, in order)")
    ch.add_argument("--system", default=None, help="system prompt (default: the chat template's)")
    ch.add_argument("--config", "-c", default=None, help="optional config for data.* (slicing, template) and "
                                                          "generate.* defaults")
    ch.add_argument("--max-new-tokens", type=int, default=None, help="answer length limit (default: "
                                                                     "generate.max_new_tokens, 256)")
    ch.add_argument("--sample", action="store_true", default=None, help="sample (default: greedy)")
    ch.add_argument("--temperature", type=float, default=None, help="with --sample (default 0.7)")
    ch.add_argument("--top-p", type=float, default=None, help="with --sample: nucleus mass (default 0.8)")
    ch.add_argument("--top-k", type=int, default=None, help="with --sample: candidates (default 100; 0: all)")
    ch.add_argument("--repetition-penalty", type=float, default=None,
                    help="> 1 discourages repeating generated tokens (default 1.0: off)")
    ch.add_argument("--seed", type=int, default=None, help="sampling seed")
    ch.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    ch.add_argument("question", nargs="?", default=None, help="the question (omit for the interactive mode)")
    _add_config_args(pr)
    pr.add_argument("--data", required=True, help="records (JSON, JSONL, Parquet; fine-tune format; the last turn "
                                                  "a question, or an answer kept as the reference)")
    pr.add_argument("--out", required=True, help="output JSON lines file")
    pr.add_argument("--actors", type=int, default=None, help="model replicas (default: generate.num_actors)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .cluster import log_control
    from .cluster.capacity import keep_ray_data_from_scaling

    keep_ray_data_from_scaling()  # before ray.data is imported: Ray Data never asks the autoscaler for nodes

    log_control.configure(args.log_level)
    try:
        return _dispatch(args)
    except Interrupted as e:  # Ctrl-C / SIGTERM: the run stopped cleanly and can be resumed
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - user errors get their message, everything else its traceback
        user_error = _user_error(e, args.command)
        if user_error is None or args.debug:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        if not isinstance(user_error, ConfigError):
            print("(rerun with --debug for the traceback)", file=sys.stderr)
        return 2


def _user_error(e: BaseException, command: str) -> BaseException | None:
    """The user-fixable error behind `e` (also when Ray wrapped it: RayTaskError, Ray Data's UserCodeException),
    or None for a bug."""
    from .path_checks import user_error_types

    types = user_error_types(merge=command == "merge")
    todo, seen = [e], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, types):
            cause = getattr(e, "cause", None)  # RayTaskError: the original exception, without Ray's frames
            return cause if isinstance(cause, types) else e
        # Ray Train's WorkerGroupError / ControllerError carry the workers' exceptions as attributes, not as causes
        todo += [*(getattr(e, "worker_failures", None) or {}).values(), getattr(e, "controller_failure", None),
                 e.__cause__, e.__context__]
    return None


def _dispatch(args) -> int:
    cmd = args.command
    if cmd in ("submit", "status", "logs", "stop"):
        from .cluster import jobs

        return jobs.cli(args)
    if cmd == "configs":
        from .recipes import configs_cmd

        return configs_cmd(args.action, args.name, args.dest, force=args.force)
    if cmd == "merge":
        return _merge(args)
    if cmd in ("chat", "predict"):
        return _infer(args)
    if cmd == "demo":
        from .demo import run_demo

        run_demo(args.out, args.overrides)
        return 0
    overrides = list(args.overrides)
    if getattr(args, "profile", False) and not any(o.startswith("train.profile_steps=") for o in overrides):
        overrides.append("train.profile_steps=5")
    cfg = _load(args.config, overrides, need_weights=cmd != "preprocess")
    if cmd == "validate":
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if cmd == "preprocess":
        from .data.pipeline import run_preprocess

        run_preprocess(cfg)
        return 0
    if cmd == "train":
        from .train.trainer import run_train

        run_train(cfg)
        return 0
    if cmd == "tune":
        from .tune.search import run_tune

        run_tune(cfg)
        return 0
    raise AssertionError(cmd)


def _load(path, overrides, need_weights: bool):
    """load_config + the checks that depend on the command (train/tune/validate load weights; preprocess does not)."""
    from .path_checks import weights_problems

    cfg = load_config(path, overrides)
    problems = weights_problems(cfg.model.path) if need_weights else []
    if problems:
        raise ConfigError(problems)
    return cfg


def _merge(args) -> int:
    from .merge.merger import run_merge
    from .path_checks import merge_input_problems

    overrides = list(args.overrides) + ([f"merge.dtype={args.dtype}"] if args.dtype else [])
    cfg = load_config(args.config, overrides, check_paths=False)
    problems = merge_input_problems(args.base, args.adapter, args.out)
    if problems:
        raise ConfigError(problems)
    run_merge(args.base, args.adapter, args.out, cfg.merge, cfg=cfg)
    return 0


def _infer(args) -> int:
    from .path_checks import infer_input_problems

    if args.command == "chat":
        cfg = load_config(args.config, [], check_paths=False)
        problems = infer_input_problems(args.model, args.adapter, images=args.image)
    else:
        cfg = load_config(args.config, args.overrides, check_paths=False)
        args.model = args.model or cfg.model.path
        problems = infer_input_problems(args.model, args.adapter, data=args.data, out=args.out)
        if args.actors is not None and args.actors < 1:
            problems.append("--actors: must be >= 1")
    if problems:
        raise ConfigError(problems)
    if args.command == "predict":
        from .infer.predict import run_predict

        summary = run_predict(cfg, args.model, args.data, args.out, adapter=args.adapter, actors=args.actors)
        print(f"predict: {summary['generated']} generated, {summary['already_done']} already done, "
              f"{summary['errors']} error(s) of {summary['records']} records in {summary['seconds']} s -> {args.out}")
        return 0
    from .infer.chat import ChatSession, run_chat
    from .infer.generation import GenerationSettings

    settings = GenerationSettings.from_config(
        cfg.generate, max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    session = ChatSession(args.model, args.adapter, tuple(args.image), settings, system=args.system,
                          max_length=cfg.data.model_max_length, llm_type=cfg.data.llm_type,
                          max_slice_nums=cfg.data.max_slice_nums if args.config else None, device=args.device,
                          downsample_mode=cfg.model.downsample_mode if args.config else None)
    return run_chat(session, args.question)


if __name__ == "__main__":
    sys.exit(main())
