"""The training stage: Ray Train (TorchTrainer, V2) workers running a DeepSpeed ZeRO-2/3 engine, LoRA or full.

    raytune-minicpmv train --config configs/minicpmv26_lora.yaml [key.path=value ...]

    from raytune_minicpmv.train.trainer import run_train, build_trainer
    summary = run_train(cfg)                                   # validate, start Ray, fit, print and return the report
    trainer = build_trainer(cfg, run_name="trial-1", callbacks=[...])   # for Tune trial drivers; trainer.fit()

One optimizer step on every rank (see docs/TRAINING.md):

1. take `gradient_accumulation_steps` micro-batches from the rank's shard (epochs chain on; every rank does the
   same number of steps because Ray splits the data equally and batches drop the ragged tail);
2. all-reduce the step's counts (label tokens, real/padded tokens, images, ...) across ranks — ONE small vector;
3. for each micro-batch: forward, sum-reduced cross entropy, backward of ``loss_sum × world / global_label_tokens``
   (DeepSpeed averages gradients over ranks, so the applied gradient is that of the mean loss over every
   non-ignored token of the whole global batch, however tokens fall across micro-batches and ranks), engine.step;
4. every `logging_steps` (and at every evaluation / checkpoint): rank 0 writes the window's metrics to the trackers
   and prints `step N/max ... elapsed, eta` (no Ray call: `ray.train.report` waits for the controller's poll);
   every `eval_steps` an evaluation (when there is an eval split), every `save_steps` and at the end a checkpoint;
   `ray.train.report` on every rank only at those steps (train_progress.py).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Callable, Iterator, Optional

import torch

from .checkpoint import TrainState, load_checkpoint
from ..config import Config, ConfigError, config_from_dict, is_uri, join_uri
from .engine import build_ds_config, build_lr_scheduler, build_optimizer, fix_cuda_arch_list, torch_dtype
from .metrics import FlopModel, StepCounts, ThroughputMeter, Timer, Trackers, format_run_report, peak_flops
from .progress import Progress, StepReporter, report_to_ray, step_actions

log = logging.getLogger(__name__)
_HF_DS_CONFIG = None  # see build_engine


# ==============================================================================================================
# Driver side


def run_train(cfg: Config) -> dict:
    """Validate, take the run dir's lock, start or join Ray, fit one training run, print and return its report.

    Rerunning the same command resumes (see `resume_check`); Ctrl-C or SIGTERM stops it cleanly (`Interrupted`)."""
    check_driver(cfg)
    from ..cluster.runlock import run_lock

    with run_lock(cfg.run_dir, command="train"):
        return _run_locked(cfg)


def _run_locked(cfg: Config) -> dict:
    from ..cluster.ray_session import check_storage, init_ray
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
    ray = init_ray(cfg)
    check_storage(cfg)  # multi-node: storage_path must be visible from every node
    check_cluster(cfg, ray.cluster_resources())
    trainer = build_trainer(cfg)
    print(f"training run {cfg.run.name!r}: checkpoints and results in {cfg.run_dir}; "
          + (f"resuming from step {plan.step} ({plan.checkpoint}); " if plan.checkpoint else "")
          + f"TensorBoard: tensorboard --logdir {tensorboard_dir(cfg)}", flush=True)
    started = time.time()
    with stop_signals() as stopped:  # after init_ray: Ray's own SIGTERM handler would kill the run uncleanly
        try:
            result = trainer.fit()
        except (KeyboardInterrupt, SystemExit):  # SystemExit: Ray Train's SIGINT handler, after aborting the run
            from ..cluster.interrupts import note_sigint

            note_sigint(stopped)
            result = None
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


def check_cluster(cfg: Config, resources: dict) -> None:
    """The cluster has the CPUs/GPUs the workers ask for (skipped with scaling.check_resources=false)."""
    sc = cfg.scaling
    if not sc.check_resources:
        return
    problems = []
    want = cfg.worker_resources
    for key, per_worker in want.items():
        have, need = float(resources.get(key, 0.0)), per_worker * sc.num_workers
        if have + 1e-9 < need:
            problems.append(f"scaling: {sc.num_workers} workers need {need:g} {key}, the cluster has {have:g} "
                            f"(lower scaling.num_workers / scaling.cpus_per_worker, or set "
                            f"scaling.check_resources=false on an autoscaling cluster)")
    if not sc.use_gpu and float(resources.get("CPU", 0.0)) - want["CPU"] * sc.num_workers < 0.1:
        problems.append("scaling.cpus_per_worker: CPU workers take every CPU and Ray Data could never schedule "
                        "its read/preprocess tasks; leave at least 0.1 CPU free (e.g. 0.8 per worker on 2 CPUs)")
    if problems:
        raise ConfigError(problems)


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
            checkpoint_config=checkpoint_config(cfg, has_eval="eval" in datasets),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            worker_runtime_env={"env_vars": runtime_env_vars(cfg)},
            logging_config=LoggingConfig(log_level=ray_train_log_level()),  # Train's own INFO lines: DEBUG only
            callbacks=list(callbacks or [])),
        datasets=datasets,
    )


def checkpoint_config(cfg: Config, has_eval: bool):
    """Keep `save_total_limit` checkpoints: the best by eval_loss when every checkpoint is evaluated (save_steps a
    multiple of eval_steps; Tune trials save at every evaluation), else the most recent. Ray always keeps the latest
    too, for resume."""
    from ray.train import CheckpointConfig

    if has_eval and cfg.train.save_steps % cfg.train.eval_steps == 0:
        return CheckpointConfig(num_to_keep=cfg.train.save_total_limit, checkpoint_score_attribute="eval_loss",
                                checkpoint_score_order="min")
    return CheckpointConfig(num_to_keep=cfg.train.save_total_limit)


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


def tensorboard_dir(cfg: Config, run_name: Optional[str] = None) -> str:
    run_dir = join_uri(cfg.run.storage_path, run_name or cfg.run.name)
    if is_uri(run_dir):  # TensorBoard writes locally; remote storage gets the Ray checkpoints only
        return os.path.join(tempfile.gettempdir(), "raytune_minicpmv_tb", run_name or cfg.run.name)
    return os.path.join(run_dir, "tensorboard")


def metrics_jsonl(cfg: Config, run_name: Optional[str] = None) -> Optional[str]:
    """Every report as one JSON line (rank 0), next to the checkpoints when the storage is a local/NFS path."""
    run_dir = join_uri(cfg.run.storage_path, run_name or cfg.run.name)
    return None if is_uri(run_dir) else os.path.join(run_dir, "metrics.jsonl")


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


# ==============================================================================================================
# Worker side


def train_fn_per_worker(config_dict: dict) -> None:
    """Ray Train worker loop: build, (resume,) train `max_steps` optimizer steps, evaluate, log, checkpoint."""
    import ray.train

    _quiet_worker_logs()
    cfg = worker_config(config_dict)
    run_name = config_dict.get("run_name", cfg.run.name)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    say = Progress(rank)
    will_fail = _fail_hook_armed(cfg, run_name)

    engine, model = build_engine(cfg, say)
    state = TrainState()
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        say(f"loading checkpoint {resumed.path} ...")
        with resumed.as_directory() as d:
            state = load_checkpoint(engine, d)
        say(f"resumed from {resumed.path} at step {state.step}")
    resumed_step = state.step
    if rank == 0:  # a resumed run logs no step twice
        from .resume_check import rewind_history

        rewind_history(metrics_jsonl(cfg, run_name), tensorboard_dir(cfg, run_name), state.step)

    from ..data.pipeline import collate

    batches = micro_batches(ray.train.get_dataset_shard("train"), cfg, collate, state)
    has_eval = dataset_shard("eval") is not None  # no eval split: no evaluation, checkpoints all the same
    meter = ThroughputMeter(FlopModel.from_model(model), peak_flops() if cfg.scaling.use_gpu else 0.0, world)
    trackers = Trackers(cfg.train.report_to, tensorboard_dir(cfg, run_name), run_name, cfg.to_dict(),
                        jsonl_path=metrics_jsonl(cfg, run_name)) if rank == 0 else None
    reporter = StepReporter(meter, trackers, rank, world, cfg.train.max_steps, say)
    engine.train()
    if state.step < cfg.train.max_steps:
        say(f"first step (world {world}, {cfg.train.gradient_accumulation_steps} micro-batch(es) of "
            f"{cfg.train.micro_batch_size} per rank; the data stream starts) ...")
    reporter.start(state.step)
    while state.step < cfg.train.max_steps:
        loss_sum, counts, step_s, wait_s, lr = train_step(engine, batches, cfg, world)
        state.step += 1
        state.tokens_seen += counts.label_tokens
        reporter.add_step(loss_sum, counts, step_s, wait_s, lr)
        if state.step == resumed_step + 1:
            say(f"first step done in {step_s:.1f} s")
        if will_fail and state.step == cfg.train.fail_at_step:
            _trigger_failure(cfg, run_name, rank)
        do = step_actions(cfg.train, state.step, has_eval)
        if not do.log:
            continue
        metrics = reporter.window_metrics(engine, state)
        metrics["resumed_from_step"] = resumed_step
        if do.evaluate:
            eval_loss = evaluate(engine, cfg)
            if eval_loss is not None:
                metrics["eval_loss"] = eval_loss
                if state.best_eval_loss is None or eval_loss < state.best_eval_loss:
                    state.best_eval_loss = eval_loss
        if state.best_eval_loss is not None:
            metrics["best_eval_loss"] = state.best_eval_loss
        reporter.log(metrics)
        if do.report:
            if do.save:
                say(f"saving checkpoint of step {state.step} ...")
            report_to_ray(engine, model, metrics, state, config_dict["config"], rank, save=do.save)
    if trackers:
        trackers.close()


def dataset_shard(name: str):
    """This worker's shard of dataset `name`, or None when the trainer has no such dataset (Ray Train V2 raises
    KeyError for a missing name, V1 returned None)."""
    import ray.train

    try:
        return ray.train.get_dataset_shard(name)
    except KeyError:
        return None


def _quiet_worker_logs() -> None:
    """Our per-report progress line says what matters; drop the per-report repeats of Ray Train (the whole report
    dict, twice per report) and DeepSpeed's per-step FutureWarnings about torch's renamed collectives."""
    import warnings

    from ray.train.v2._internal.execution import context, storage

    for name in (context.__file__, storage.__name__):  # Ray names the first logger by its file path
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def worker_config(config_dict: dict) -> Config:
    """The Config inside the worker: the driver's dict plus any dotted top-level overrides (Tune trials)."""
    import copy

    raw = copy.deepcopy(config_dict["config"])
    for key, value in config_dict.items():
        if "." in key:
            node = raw
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    return config_from_dict(raw, check_paths=False)


def build_engine(cfg: Config, say: Callable[[str], None] = lambda msg: None):
    """Model (ZeRO-3: materialized partitioned under zero.Init), trainable policy, optimizer, schedule, engine.

    `deepspeed.zero_stage` / `model.gradient_checkpointing` = auto are resolved first (engine_plan: the cheapest
    choice whose memory estimate fits the card); the estimate and the choice go to `say`, which gets a line before
    each long phase too (rank 0's Progress in the worker; silent by default).
    """
    fix_cuda_arch_list()
    import deepspeed
    import torch.distributed as dist

    from .engine_plan import local_capacity_bytes, plan_engine
    from ..models import apply_trainable_policy, enable_gradient_checkpointing, format_parameter_table, load_model_for
    from .profiling import attach_profiler

    torch.manual_seed(cfg.run.seed)  # same LoRA init on every rank
    deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")  # wraps Ray's group
    world, rank = dist.get_world_size(), dist.get_rank()
    # the smallest card of the group decides, so every rank makes the same choice
    capacity = all_reduce(torch.tensor([local_capacity_bytes(cfg.scaling.use_gpu, _local_workers(cfg))],
                                       dtype=torch.float64), _comm_device(cfg), op=dist.ReduceOp.MIN)
    plan = plan_engine(cfg, world, int(capacity.item()))
    say(plan.describe())
    cfg = plan.apply(cfg)
    ds_cfg = build_ds_config(cfg)
    dtype = torch_dtype(cfg)
    global _HF_DS_CONFIG
    _HF_DS_CONFIG = None
    if cfg.deepspeed.zero_stage == 3:
        # While this object is alive, transformers' from_pretrained (inside load_model) builds the model under
        # deepspeed.zero.Init — every parameter is partitioned as it is created, so no rank ever holds the whole
        # model — and loads the checkpoint shard by shard into the partitions.
        from transformers.integrations import HfDeepSpeedConfig

        _HF_DS_CONFIG = HfDeepSpeedConfig(ds_cfg)  # transformers keeps only a weak reference
    zero3 = " under ZeRO-3 (partitioned while loading)" if cfg.deepspeed.zero_stage == 3 else ""
    say(f"loading model {cfg.model.path} ({cfg.model.dtype}){zero3} ...")
    t0 = time.perf_counter()
    model = load_model_for(cfg.model, dtype)  # model.path, attn_implementation, trust_remote_code
    model = apply_trainable_policy(model, cfg.trainable, cfg.lora)
    say(f"model loaded in {time.perf_counter() - t0:.1f} s; parameters per part:\n{format_parameter_table(model)}")
    _cast_new_trainables(model, dtype)
    enable_gradient_checkpointing(model, mode=cfg.model.gradient_checkpointing)  # non-reentrant
    optimizer = build_optimizer(model, cfg)
    say(f"DeepSpeed initialize (ZeRO-{cfg.deepspeed.zero_stage}, {cfg.model.dtype}) ...")
    t0 = time.perf_counter()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=build_lr_scheduler(
        optimizer, cfg), config=ds_cfg)
    say(f"DeepSpeed ready in {time.perf_counter() - t0:.1f} s")
    attach_profiler(engine, cfg, rank)  # train.profile_steps > 0 only
    return engine, model


def _comm_device(cfg: Config):
    return torch.device("cuda", torch.cuda.current_device()) if cfg.scaling.use_gpu and torch.cuda.is_available() \
        else torch.device("cpu")


def _local_workers(cfg: Config) -> int:
    """CPU runs share the host's memory between the workers on it (LOCAL_WORLD_SIZE from Ray Train / torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", cfg.scaling.num_workers))


def _cast_new_trainables(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """PEFT creates LoRA weights in fp32 next to a bf16 base; DeepSpeed's bf16/fp16 engine needs one dtype (it
    keeps the fp32 master copies itself). ZeRO-3-partitioned (loaded) tensors already have the load dtype."""
    for p in model.parameters():
        if p.requires_grad and not hasattr(p, "ds_id") and p.dtype != dtype:
            p.data = p.data.to(dtype)


def all_reduce(t: torch.Tensor, device, op=None) -> torch.Tensor:
    """all_reduce a small CPU tensor through the process group's device (NCCL only reduces CUDA tensors)."""
    import torch.distributed as dist

    d = t.to(device)
    dist.all_reduce(d, op=op or dist.ReduceOp.SUM)
    return d.cpu()


def micro_batches(shard, cfg: Config, collate, state: TrainState) -> Iterator[dict]:
    """Endless micro-batches of this rank's shard, epoch after epoch, resuming at `state`'s data position.

    Keeps `state.epoch` / `state.batch_in_epoch` current, so a checkpoint records where the data stands.
    """
    skip = state.batch_in_epoch
    while True:
        n = 0
        it = shard.iter_torch_batches(batch_size=cfg.train.micro_batch_size, collate_fn=collate, drop_last=True)
        for batch in it:
            n += 1
            if n <= skip:
                continue  # resume: these were consumed before the checkpoint
            state.batch_in_epoch = n
            yield batch
        if n == 0:
            raise RuntimeError("the train split yields no micro-batch on this rank: it needs at least "
                               "num_workers × micro_batch_size rows")
        skip = 0
        state.epoch += 1
        state.batch_in_epoch = 0


def train_step(engine, batches: Iterator[dict], cfg: Config, world: int):
    """One optimizer step; returns (local loss sum, global StepCounts, step s, data-wait s, lr applied)."""

    from ..models import compute_loss

    with Timer() as step_t:
        with Timer() as wait_t:
            micro = [next(batches) for _ in range(cfg.train.gradient_accumulation_steps)]
        local = StepCounts()
        for b in micro:
            local = local + StepCounts.of_batch(b)
        # the global token count of this step (the loss denominator) and the throughput counts, in one collective
        counts = StepCounts.from_tensor(all_reduce(local.as_tensor(), engine.device))
        scale = world / max(counts.label_tokens, 1.0)
        loss_total = 0.0
        lr = float(engine.get_lr()[0])  # the lr this step applies (the scheduler moves on inside engine.step)
        for b in micro:
            b = to_device(b, engine.device)
            logits = engine(b).logits
            loss_sum, _ = compute_loss(logits, b["labels"])
            engine.backward(loss_sum * scale, scale_wrt_gas=False)
            engine.step()
            loss_total += float(loss_sum.detach())
    return loss_total, counts, step_t.seconds, wait_t.seconds, lr


@torch.no_grad()
def evaluate(engine, cfg: Config) -> Optional[float]:
    """Token-weighted eval loss over the eval split (all_reduce of loss sum and token count; no logit gathering).

    Every rank runs the same number of forwards (a ZeRO-3 forward is a collective): before each batch the ranks
    agree (all_reduce MIN) that all of them still have one.
    """
    import torch.distributed as dist

    from ..models import compute_loss
    from ..data.pipeline import collate

    shard = dataset_shard("eval")
    if shard is None:
        return None
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    it = iter(shard.iter_torch_batches(batch_size=cfg.train.micro_batch_size, collate_fn=collate, drop_last=False))
    n = 0
    while cfg.train.eval_max_batches is None or n < cfg.train.eval_max_batches:
        batch = next(it, None)
        have = all_reduce(torch.tensor([0 if batch is None else 1], dtype=torch.int64), engine.device,
                          op=dist.ReduceOp.MIN)
        if not have.item():
            break
        b = to_device(batch, engine.device)
        loss_sum, n_tok = compute_loss(engine(b).logits, b["labels"])
        totals += torch.tensor([float(loss_sum), float(n_tok)], dtype=torch.float64)
        n += 1
    engine.train()
    totals = all_reduce(totals, engine.device)
    return float(totals[0] / totals[1]) if totals[1] > 0 else None


def to_device(obj, device):
    """Move the collate dict (tensors, lists of tensors) to the engine's device."""
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


# Test hook (train.fail_at_step): raise once, on the first attempt only. The marker lives in the run directory,
# decided at worker start so that every rank of one attempt agrees.
def _fail_marker(cfg: Config, run_name: str) -> Optional[str]:
    run_dir = join_uri(cfg.run.storage_path, run_name)
    return None if is_uri(run_dir) else os.path.join(run_dir, f".fail_at_step_{cfg.train.fail_at_step}")


def _fail_hook_armed(cfg: Config, run_name: str) -> bool:
    marker = _fail_marker(cfg, run_name) if cfg.train.fail_at_step else None
    return bool(marker) and not os.path.exists(marker)


def _trigger_failure(cfg: Config, run_name: str, rank: int) -> None:
    import torch.distributed as dist

    if rank == 0:
        marker = _fail_marker(cfg, run_name)
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        open(marker, "w").close()
    dist.barrier()  # the marker exists before any rank fails (a failing rank tears the whole group down)
    raise RuntimeError(f"train.fail_at_step={cfg.train.fail_at_step}: injected failure (test hook)")
