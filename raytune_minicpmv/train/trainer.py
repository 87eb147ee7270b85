"""The training stage: Ray Train (TorchTrainer, V2) workers running a DeepSpeed ZeRO-2/3 engine, LoRA or full.

    raytune-minicpmv train --config configs/minicpmv26_lora.yaml [key.path=value ...]

    from raytune_minicpmv.train.trainer import run_train, build_trainer
    summary = run_train(cfg)                                   # validate, start Ray, fit, print and return the report
    trainer = build_trainer(cfg, run_name="trial-1", callbacks=[...])   # for Tune trial drivers; trainer.fit()

The driver side lives here; the loop each Ray Train worker runs is `worker.py`. One optimizer step on every rank
(see docs/TRAINING.md):

1. take `gradient_accumulation_steps` micro-batches from the rank's shard (epochs chain on; every rank does the
   same number of steps because Ray splits the data equally and batches drop the ragged tail);
2. all-reduce the step's counts (label tokens, real/padded tokens, images, ...) across ranks — ONE small vector;
3. for each micro-batch: forward, sum-reduced cross entropy, backward of ``loss_sum × world / global_label_tokens``
   (DeepSpeed averages gradients over ranks, so the applied gradient is that of the mean loss over every
   non-ignored token of the whole global batch, however tokens fall across micro-batches and ranks), engine.step;
4. every `logging_steps` (and at every evaluation / checkpoint): rank 0 writes the window's metrics to the trackers
   and prints `step N/max ... elapsed, eta` (no Ray call: `ray.train.report` waits for the controller's poll);
   every `eval_steps` an evaluation (when there is an eval split), every `save_steps` and at the end a checkpoint;
   `ray.train.report` on every rank only at those steps (progress.py).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

from ..config import Config, ConfigError, TrainConfig, is_uri, join_uri
from .metrics import format_run_report
from .worker import metrics_jsonl, tensorboard_dir, train_fn_per_worker

log = logging.getLogger(__name__)


# ==============================================================================================================
# Driver side


def run_train(cfg: Config) -> dict:
    """Validate, take the run dir's lock, start or join Ray, fit one training run, print and return its report.

    Rerunning the same command resumes (see `resume_check`); Ctrl-C or SIGTERM stops it cleanly (`Interrupted`)."""
    check_driver(cfg)
    from ..cluster.ray_session import check_storage, init_ray
    from ..cluster.runlock import run_lock

    init_ray(cfg)
    check_storage(cfg.run)  # multi-node: storage_path must be visible from every node (before the lock writes to it)
    with run_lock(cfg.run_dir, command="train"):
        return _run_locked(cfg)


def _run_locked(cfg: Config) -> dict:
    from ..cluster.ray_session import init_ray
    from ..cluster.interrupts import stop_signals
    from .resume_check import prepare_resume

    plan = prepare_resume(cfg)
    if plan.finished:
        print(f"training run {cfg.run.name!r} already finished at step {plan.step} (train.max_steps="
              f"{cfg.train.max_steps}); its last checkpoint is {plan.checkpoint}. Raise train.max_steps to train "
              f"on, or pick a new run.name.", flush=True)
        return {"run_dir": cfg.run_dir, "already_finished": True, "steps": plan.step, "checkpoint": plan.checkpoint}
    for key, (old, new) in plan.applied.items():
        print(f"resume: {key} changed from {old!r} to {new!r} (applied)", flush=True)
    from ..cluster.capacity import cluster_capacity, pending_resources_watch

    init_ray(cfg)  # already started by run_train: returns the module
    check_cluster(cfg, cluster_capacity(cfg))
    trainer = build_trainer(cfg)
    print(f"training run {cfg.run.name!r}: checkpoints and results in {cfg.run_dir}; "
          + (f"resuming from step {plan.step} ({plan.checkpoint}); " if plan.checkpoint else "")
          + f"TensorBoard: tensorboard --logdir {tensorboard_dir(cfg)}", flush=True)
    started = time.time()
    with stop_signals() as stopped:  # after init_ray: Ray's own SIGTERM handler would kill the run uncleanly
        try:
            with pending_resources_watch(cfg):
                result = trainer.fit()
        except (KeyboardInterrupt, SystemExit):  # SystemExit: Ray Train's SIGINT handler, after aborting the run
            from ..cluster.interrupts import note_sigint

            note_sigint(stopped)
            result = None
    from ..cluster.capacity import release_autoscaling_requests

    release_autoscaling_requests()  # the workers' GPU nodes may go (idle timeout)
    if stopped.signum:
        _raise_interrupted(cfg, stopped.name)
    summary = summarize(cfg, result, wall_s=time.time() - started)
    print(format_run_report(summary), flush=True)
    return summary


def _raise_interrupted(cfg: Config, signame: str) -> None:
    import signal

    from ..cluster.interrupts import Interrupted
    from .resume_check import repair_snapshot

    latest = None if is_uri(cfg.run_dir) else repair_snapshot(cfg.run_dir)[0]
    kept = f"the last checkpoint is {join_uri(cfg.run_dir, latest)}" if latest else "no checkpoint was saved yet"
    raise Interrupted(f"interrupted — rerun the same command to resume (training run {cfg.run.name!r} stopped by "
                      f"{signame}; {kept})", getattr(signal, signame))


def check_driver(cfg: Config) -> None:
    """Everything checkable before any worker starts: model family, tracker packages. Raises ConfigError."""
    problems = []
    try:
        from ..models import get_family

        get_family(cfg.model.family)
    except (KeyError, ValueError) as e:
        problems.append(f"model.family: {e}")
    for backend in cfg.train.report_to:
        module = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}[backend]
        try:
            __import__(module)
        except ImportError:
            problems.append(f"train.report_to: {backend} is not installed (pip install {module}, or drop it)")
    if problems:
        raise ConfigError(problems)


def check_cluster(cfg: Config, resources) -> None:
    """The cluster can hold the workers (skipped with scaling.check_resources=false).

    `resources`: `ray.cluster_resources()`, or a `cluster.capacity.Capacity`. On an autoscaling cluster the workers
    must fit in what it can grow to; what is not up yet is a warning naming what the run waits for, not an error."""
    from ..cluster.capacity import Capacity

    sc = cfg.scaling
    if not sc.check_resources:
        return
    cap = resources if isinstance(resources, Capacity) else Capacity(dict(resources), dict(resources))
    problems, waiting = [], []
    want = cfg.worker_resources
    for key, per_worker in want.items():
        have, limit, need = cap.now.get(key, 0.0), cap.max.get(key, 0.0), per_worker * sc.num_workers
        if limit + 1e-9 < need:
            where = (f"the cluster can grow to {limit:g} ({cap.source})" if cap.autoscaling
                     else f"the cluster has {have:g}")
            problems.append(f"scaling: {sc.num_workers} workers need {need:g} {key}, {where} (lower "
                            f"scaling.num_workers / scaling.cpus_per_worker, or set scaling.check_resources=false)")
        elif have + 1e-9 < need:
            waiting.append(f"{need:g} {key} (up now: {have:g}, can grow to {limit:g})")
    if not sc.use_gpu and cap.max.get("CPU", 0.0) - want["CPU"] * sc.num_workers < 0.1:
        problems.append("scaling.cpus_per_worker: CPU workers take every CPU and Ray Data could never schedule "
                        "its read/preprocess tasks; leave at least 0.1 CPU free (e.g. 0.8 per worker on 2 CPUs)")
    if problems:
        raise ConfigError(problems)
    if waiting:
        log.warning("autoscaling cluster (%s): the %d workers wait for the autoscaler to add %s", cap.source,
                    sc.num_workers, ", ".join(waiting))


def build_trainer(cfg: Config, run_name: Optional[str] = None, callbacks: Optional[list] = None,
                  datasets: Optional[dict] = None):
    """A TorchTrainer for one run. Reusing `run_name` under `run.storage_path` resumes that run.

    The worker receives the config as a plain dict (`train_loop_config`); a Tune driver passes a trial's config
    (e.g. its lr already applied with `config.replace`). Dotted keys at the top level of that dict
    (``{"optim.lr": 3e-4}``) are applied as overrides in the worker too.
    """
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..cluster.ray_session import runtime_env_vars
    from ..cluster.log_control import ray_train_log_level

    run_name = run_name or cfg.run.name
    if datasets is None:
        datasets = build_datasets(cfg)
    sc = cfg.scaling
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_name": run_name},
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                     resources_per_worker=cfg.worker_resources,
                                     accelerator_type=sc.accelerator_type if sc.use_gpu else None),
        run_config=RunConfig(
            name=run_name, storage_path=cfg.run.storage_path,
            checkpoint_config=checkpoint_config(cfg.train, has_eval="eval" in datasets),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            worker_runtime_env={"env_vars": runtime_env_vars(cfg)},
            logging_config=LoggingConfig(log_level=ray_train_log_level()),  # Train's own INFO lines: DEBUG only
            callbacks=list(callbacks or [])),
        datasets=datasets,
        dataset_config=ingest_config(),
    )


def ingest_config():
    """Ray Train's DataConfig for a run: Ray Data's ingest defaults, with the stream kept in the data's order.

    Ray Data hands out blocks as their tasks finish by default (`preserve_order=False`), so one config's runs saw
    different batch sequences, and a resumed run, which skips the micro-batches it had consumed, would have
    skipped others (some samples twice in that epoch, some never). Blocks finished early wait in the object store
    for their turn. The GPU benchmarks' data wait was ≈ 0 % of the step without it (docs/PERFORMANCE.md), which
    leaves that room; test: tests/integration/test_ingest_order.py."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def checkpoint_config(tr: TrainConfig, has_eval: bool):
    """Keep `save_total_limit` checkpoints: the best by eval_loss when every checkpoint is evaluated (save_steps a
    multiple of eval_steps; Tune trials save at every evaluation), else the most recent. Ray always keeps the latest
    too, for resume."""
    from ray.train import CheckpointConfig

    if has_eval and tr.save_steps % tr.eval_steps == 0:
        return CheckpointConfig(num_to_keep=tr.save_total_limit, checkpoint_score_attribute="eval_loss",
                                checkpoint_score_order="min")
    return CheckpointConfig(num_to_keep=tr.save_total_limit)


def build_datasets(cfg: Config) -> dict:
    """The train (and, when there is one, eval) dataset; a split too small to train / evaluate is refused here,
    in the driver, before any worker starts (ConfigError)."""
    from ..data.pipeline import build_dataset

    datasets = {"train": build_dataset(cfg, "train")}
    if cfg.data.eval_path or cfg.data.preprocessed:
        eval_ds = build_dataset(cfg, "eval")
        if eval_ds is not None:
            datasets["eval"] = eval_ds
    check_split_rows(cfg, {split: split_rows(cfg, split) for split in datasets})
    return datasets


def split_rows(cfg: Config, split: str) -> int:
    """Rows of a split, counted cheaply in the driver: preprocessed, the kept rows of its Parquet (one small
    column is read); raw, the records of the file (an upper bound: preprocessing may still skip some)."""
    if cfg.data.preprocessed:
        import pyarrow.compute as pc
        import pyarrow.dataset as pads

        ds = pads.dataset(join_uri(cfg.data_output_path, split), format="parquet")
        if not ds.files:
            return 0
        reasons = ds.to_table(columns=["skip_reason"]).column("skip_reason")
        return int(pc.sum(pc.equal(reasons, "")).as_py() or 0)
    from ..data.records import read_raw_records

    return sum(1 for _ in read_raw_records(cfg.data.train_path if split == "train" else cfg.data.eval_path))


def check_split_rows(cfg: Config, rows: dict[str, int]) -> None:
    """Every rank needs one train micro-batch (Ray splits rows equally, batches drop the ragged tail) and, when
    there is an eval split, one eval row (else no rank can evaluate and the checkpoint has no eval_loss)."""
    workers, micro = cfg.scaling.num_workers, cfg.train.micro_batch_size
    where = {"train": cfg.data.train_path, "eval": cfg.data.eval_path}
    if cfg.data.preprocessed:
        where = {split: join_uri(cfg.data_output_path, split) for split in where}
    problems = []
    if rows["train"] < workers * micro:
        problems.append(f"data.train_path: the train split ({where['train']}) has {rows['train']} rows; "
                        f"{workers} workers x train.micro_batch_size {micro} need at least {workers * micro}")
    if "eval" in rows and rows["eval"] < workers:
        fix = "drop data.eval_path to train without evaluation" if rows["eval"] == 0 else "add rows"
        problems.append(f"data.eval_path: the eval split ({where['eval']}) has {rows['eval']} rows; each of the "
                        f"{workers} workers needs at least one ({fix})")
    if problems:
        raise ConfigError(problems)


def read_history(cfg: Config) -> list[dict]:
    import json

    path = metrics_jsonl(cfg)
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(cfg: Config, result, wall_s: float) -> dict:
    m = dict(result.metrics or {})
    history = read_history(cfg)
    best = [(c.path, cm.get("eval_loss")) for c, cm in (result.best_checkpoints or [])]
    return {
        "run_dir": result.path,
        "steps": int(m.get("step", 0)),
        "resumed_from_step": m.get("resumed_from_step"),
        "final_loss": m.get("loss"),
        "final_eval_loss": m.get("eval_loss"),
        "best_eval_loss": m.get("best_eval_loss"),
        "tokens_seen": m.get("tokens_seen"),
        "train_time_s": m.get("train_time_s"),
        "wall_time_s": wall_s,
        "mean_tokens_per_s": m.get("mean_tokens_per_s"),
        "mean_mfu": m.get("mean_mfu"),
        "peak_gpu_mem_gib": m.get("peak_gpu_mem_gib"),
        "peak_rss_gib": m.get("peak_rss_gib"),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "kept_checkpoints": [p for p, _ in best],
        "tensorboard": tensorboard_dir(cfg),
        "metrics_jsonl": metrics_jsonl(cfg),
        "loss_history": [(h["step"], round(h["loss"], 4)) for h in history],
        "eval_history": [(h["step"], round(h["eval_loss"], 4)) for h in history if "eval_loss" in h],
        "error": repr(result.error) if getattr(result, "error", None) else None,
    }
