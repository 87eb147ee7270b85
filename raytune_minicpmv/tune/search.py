"""Learning-rate search with Ray Tune + ASHA over training runs, then a merge of the best trial.

    raytune-minicpmv tune --config configs/minicpmv26_tune.yaml [key.path=value ...]

Story of `run_tune`: validate → connect to Ray → preprocess ONCE to Parquet (every trial reads it) → one Tune trial per
sampled config, each trial a small *driver* function on a CPU that builds and fits a Ray Train `TorchTrainer` (Train V2:
``Tuner(trainer)`` is gone) → ASHA stops bad learning rates at evaluation milestones → pick the best trial by its best
evaluated checkpoint → report (table, plot, report.md) → merge that checkpoint into the base model (a Ray task).

Restart: rerunning the same command (same run.name + run.storage_path) restores the experiment: finished trials are
kept, unfinished ones resume from their last Train checkpoint (trial run names are derived from stable trial ids).
Ctrl-C / SIGTERM: Tune stops the trials and saves its state; nothing is reported or merged and the command exits
130/143 with "interrupted — rerun the same command to resume". One driver per run dir (`runlock`); `<run>/data` is
reused only while its input fingerprint matches (`data_fingerprint`).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from ..config import Config, ConfigError, RunConfig, TuneConfig, join_uri, replace
from ..cluster.log_control import tune_verbosity
from .selection import CHECKPOINT_KEY, collect_trials, full_trial_reports, select_best

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Entry


def run_tune(cfg: Config) -> dict:
    """Run the search, report it, merge the best trial. Returns a summary dict (also written to report.md)."""
    from .. import cluster
    from ..cluster.runlock import run_lock

    cfg = _tune_ready(cfg)
    cluster.init_ray(cfg)
    cluster.check_storage(cfg.run)  # multi-node: storage_path must be shared (before the lock writes to it)
    with run_lock(cfg.run_dir, command="tune"):  # <run_dir> holds the preprocessed data and the merged model
        return _run_locked(cfg)


def _run_locked(cfg: Config) -> dict:
    from .. import cluster
    from ..cluster.interrupts import note_sigint, stop_signals

    reuse_data = _check_preprocessed(cfg)  # before any trial: stale rows of a running search are refused
    from ..cluster.capacity import cluster_capacity, pending_resources_watch

    cluster.init_ray(cfg)  # already started by run_tune: returns the module
    concurrency = max_concurrent_trials(cfg, cluster_capacity(cfg))
    cfg = _ensure_preprocessed(cfg, reuse_data)
    exp_dir = join_uri(cfg.run.storage_path, experiment_name(cfg.run))
    log.info("tune experiment: %s (metric %s/%s, %d concurrent trials)", exp_dir, cfg.tune.metric, cfg.tune.mode,
             concurrency)

    t0 = time.time()
    with stop_signals() as stopped:  # SIGTERM takes Tune's graceful SIGINT path (it saves the experiment state)
        try:
            with pending_resources_watch(cfg):  # says what trials wait for while the autoscaler adds nodes
                results = _build_or_restore_tuner(cfg, concurrency).fit()
        except KeyboardInterrupt:  # a second Ctrl-C: Tune gives up its graceful stop
            note_sigint(stopped)
            results = None
    elapsed = time.time() - t0
    from ..cluster.capacity import release_autoscaling_requests

    release_autoscaling_requests()  # the trials' GPU nodes may go (idle timeout) while we report and merge
    _raise_if_incomplete(results, stopped, exp_dir)

    trials = collect_trials(results, cfg)
    best = select_best(trials, cfg.tune.metric, cfg.tune.mode)
    from .report import write_tune_report

    summary = write_tune_report(exp_dir, trials, best, cfg, elapsed)
    if cfg.merge.enabled:
        from ..merge.merger import run_merge

        merged = run_merge(cfg.model.path, os.path.join(best.checkpoint_path, "adapter"), cfg.merge_output_path,
                           cfg.merge, cfg=cfg)
        summary["merged_path"] = str(merged)
        log.info("merged model: %s", merged)
    print(f"best trial {best.trial_id}: {cfg.tune.metric}={best.metric:.4f} at step {best.step} "
          f"(lr={best.config.get('lr'):.3g}); checkpoint {best.checkpoint_path}")
    if "merged_path" in summary:
        print(f"merged model: {summary['merged_path']}")
    return summary


def _raise_if_incomplete(results, stopped, exp_dir: str) -> None:
    """An interrupted search publishes nothing. Tune's SIGINT handler ends `fit` normally and, stopping the live
    trials, marks them TERMINATED in memory (so `results` looks complete and the interrupted trial looks "stopped by
    ASHA"); the experiment state it saved just before shows them as they really were. That state is what a rerun
    restores, so it decides: any trial still PENDING/RUNNING/PAUSED there means the search is unfinished."""
    import signal

    from ray.tune import ExperimentAnalysis

    from ..cluster.interrupts import Interrupted

    unfinished = None
    if results is not None:
        saved = ExperimentAnalysis(exp_dir).trials
        unfinished = [t for t in saved if t.status not in ("TERMINATED", "ERROR")]
        if not unfinished and not stopped.signum:
            return
    name = stopped.name or "SIGINT"  # Tune's own handler caught Ctrl-C: ours never saw it
    left = f"{len(unfinished)} trial(s) unfinished" if unfinished is not None else "trials unfinished"
    raise Interrupted(f"interrupted — rerun the same command to resume (tune experiment {exp_dir} stopped by {name} "
                      f"with {left}; nothing was merged)", getattr(signal, name))


# --------------------------------------------------------------------------------------------------------------
# Validation and derived settings


def _tune_ready(cfg: Config) -> Config:
    """Trial runs checkpoint at every evaluation so the best *evaluated* weights exist to merge."""
    problems = []
    if cfg.tune.metric == "eval_loss" and not cfg.data.eval_path and not cfg.data.preprocessed:
        problems.append("data.eval_path: tune ranks trials by eval_loss; give an eval split "
                        "(or set tune.metric to a training metric such as loss)")
    if problems:
        raise ConfigError(problems)
    return replace(cfg, train={"save_steps": cfg.train.eval_steps})


def max_concurrent_trials(cfg: Config, resources) -> int:
    """Derived from the cluster: how many trials' workers (GPUs, or CPUs on a CPU cluster, and any
    scaling.resources_per_worker) fit at once. `resources`: `ray.cluster_resources()` or a `cluster.capacity.Capacity`;
    on an autoscaling cluster it is what the cluster can grow to, not what is up at submit time (GPU nodes scale from
    zero). Fails fast when the configured concurrency cannot fit."""
    from ..cluster.capacity import Capacity, trials_that_fit

    cap = resources if isinstance(resources, Capacity) else Capacity(dict(resources), dict(resources))
    sc = cfg.scaling
    keys = ["GPU" if sc.use_gpu else "CPU", *sc.resources_per_worker]
    per_trial = {k: sc.num_workers * cfg.worker_resources[k] + cfg.tune.driver_resources.get(k, 0.0) for k in keys}
    fits, key = trials_that_fit(per_trial, cap.max)
    have, need = cap.max.get(key, 0.0), per_trial[key]
    want = cfg.tune.max_concurrent_trials
    if want is None:
        if fits < 1:
            if cap.autoscaling:
                raise ConfigError([f"scaling.num_workers: one trial needs {need:g} {key}, the cluster can grow to "
                                   f"{have:g} ({cap.source})"])
            if key == "GPU":
                raise ConfigError([f"tune.max_concurrent_trials: the cluster has {have:g} GPUs now (autoscaling from "
                                   f"zero?); set it explicitly (each trial takes {sc.num_workers} GPUs) or name the "
                                   "cluster config in ray.autoscaling_config"])
            raise ConfigError([f"scaling.num_workers: one trial needs {need:g} {key}{'s' if key == 'CPU' else ''}, "
                               f"the cluster has {have:g}"])
        if cap.autoscaling:
            log.info("tune: %d concurrent trials, from what the cluster can grow to (%g %s, %s)", fits, have, key,
                     cap.source)
        return fits
    key = keys[0]
    have, need = (cap.max if cap.autoscaling else cap.now).get(key, 0.0), per_trial[key]
    if cap.autoscaling and want * need > have + 1e-9:
        log.warning("tune.max_concurrent_trials=%d × %g %s per trial exceeds the %g the cluster can grow to (%s); "
                    "at most %d run at once", want, need, key, have, cap.source, max(fits, 1))
    elif not cap.autoscaling and have > 0 and want * need > have + 1e-9:
        log.warning("tune.max_concurrent_trials=%d × %g %s per trial exceeds the %g the cluster has now; the "
                    "extra trials wait for the autoscaler", want, need, key, have)
    return want


def experiment_name(run_cfg: RunConfig) -> str:
    return f"{run_cfg.name}-tune"


def _check_preprocessed(cfg: Config) -> bool:
    """True: reuse `<run>/data`, made from the same inputs. False: (re)preprocess — none yet, or its inputs changed
    and no search has trained on it. Inputs changed under an existing search: ConfigError (its trials would mix)."""
    if cfg.data.preprocessed:
        return True
    from ..data.fingerprint import stale_preprocessed

    reasons = stale_preprocessed(cfg)
    if not reasons:
        return reasons is not None
    exp_dir = join_uri(cfg.run.storage_path, experiment_name(cfg.run))
    if os.path.isdir(exp_dir):
        raise ConfigError([f"data: the inputs changed since {cfg.data_output_path} was preprocessed for the search in "
                           f"{exp_dir} ({'; '.join(reasons)}); its trials trained on the old rows. Restore the old "
                           "inputs to resume it, or start a new search with another run.name"])
    log.warning("redoing the preprocessed data at %s: %s", cfg.data_output_path, "; ".join(reasons))
    return False


def _ensure_preprocessed(cfg: Config, reuse: bool) -> Config:
    """Preprocess once; every trial then reads the same Parquet (no per-trial image decoding or tokenization)."""
    if cfg.data.preprocessed:
        return cfg
    from ..data.pipeline import run_preprocess

    if reuse:
        log.info("reusing preprocessed data at %s (same inputs)", cfg.data_output_path)
    else:
        run_preprocess(cfg)
    return replace(cfg, data={"preprocessed": True, "output_path": cfg.data_output_path})


# --------------------------------------------------------------------------------------------------------------
# Search space, trial driver, tuner


def search_space(tune_cfg: TuneConfig) -> dict:
    from ray import tune

    s = tune_cfg.search
    space: dict[str, Any] = {}
    space["lr"] = tune.loguniform(*s.lr) if s.lr_sampler == "loguniform" else tune.grid_search(list(s.lr))
    for name in ("weight_decay", "lora_r", "warmup_ratio"):
        values = getattr(s, name)
        if values:
            space[name] = tune.grid_search(list(values))
    return space


def trial_config(cfg: Config, params: dict) -> Config:
    """The run config of one trial: the base config with the sampled values."""
    optim = {k: params[k] for k in ("lr", "weight_decay", "warmup_ratio") if k in params}
    out = replace(cfg, optim=optim) if optim else cfg
    if "lora_r" in params:
        out = replace(out, lora={"r": int(params["lora_r"]), "alpha": int(params["lora_r"])})
    return out


def make_trial_driver(cfg: Config):
    """A Tune function trainable: one Train run per trial, its eval reports forwarded to Tune."""
    cfg_dict = cfg.to_dict()

    def trial_driver(params: dict) -> None:
        from ray import tune

        from ..config import config_from_dict
        from ..train.resume_check import prepare_resume
        from ..train.trainer import build_trainer

        base = config_from_dict(cfg_dict, check_paths=False)
        trial_id = tune.get_context().get_trial_id()
        run_name = f"{experiment_name(base.run)}-trial-{trial_id}"
        trial_cfg = trial_config(base, params)
        plan = prepare_resume(trial_cfg, run_name, check_config=False)  # a restored trial skips damaged checkpoints
        if plan.finished:
            # Interrupted after its Train run ended but before Tune got the last report (Tune stops listening first):
            # forward the final checkpointed evaluation, or the restored trial would end with no new result.
            tune.report({**plan.metrics, CHECKPOINT_KEY: plan.checkpoint})
            return
        trainer = build_trainer(trial_cfg, run_name=run_name, callbacks=[EvalReportCallback(base.tune.metric)])
        trainer.fit()

    return trial_driver


def trial_progress_callbacks(cfg: Config) -> list:
    from ..cluster.log_control import want_trial_lines
    from .report import trial_progress_callback

    if not want_trial_lines():
        return []
    return [trial_progress_callback(cfg.tune.metric, full_trial_reports(cfg.tune, cfg.train))]


def _build_or_restore_tuner(cfg: Config, concurrency: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from ..cluster.ray_session import driver_resources

    # trial drivers only wait on their TorchTrainer: a sliver of CPU, on the CPU head where the cluster has one
    trainable = tune.with_resources(make_trial_driver(cfg), driver_resources(cfg.ray, dict(cfg.tune.driver_resources)))
    path = join_uri(cfg.run.storage_path, experiment_name(cfg.run))
    if tune.Tuner.can_restore(path):
        log.info("restoring tune experiment from %s", path)
        return tune.Tuner.restore(path, trainable, resume_errored=True)
    if cfg.tune.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=full_trial_reports(cfg.tune, cfg.train),
                                  grace_period=cfg.tune.grace_period, reduction_factor=cfg.tune.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=search_space(cfg.tune),
        tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=cfg.tune.num_samples,
                                    scheduler=scheduler, max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name=experiment_name(cfg.run), storage_path=cfg.run.storage_path,
                                  failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
                                  # Tune's tables only at --log-level DEBUG; one line per trial start/end otherwise
                                  verbose=tune_verbosity(), callbacks=trial_progress_callbacks(cfg)),
    )


def EvalReportCallback(metric: str):  # noqa: N802 - behaves as a class for callers
    """A Train callback that forwards only evaluation reports (those carrying `metric`) to Tune, each with the path
    of the checkpoint saved at that step — so one Tune iteration is one evaluation, ASHA's unit. Train workers call
    `ray.train.report` only at evaluation and checkpoint steps (per-step metrics bypass Ray: train_progress.py), and
    `_tune_ready` makes every evaluation a checkpoint step, so each forwarded report carries a checkpoint."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _EvalReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return _EvalReportCallback()
