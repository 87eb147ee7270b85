"""What the training loop reports, when, and to whom (worker side of train.py).

    do = step_actions(cfg.train, step, has_eval)     # log / evaluate / save / report, decided alike on every rank
    reporter = StepReporter(meter, trackers, rank, world, cfg.train.max_steps)
    reporter.add_step(loss_sum, counts, step_s, wait_s, lr)
    metrics = reporter.window_metrics(engine, state)  # collective (loss all-reduce): every rank, at log steps
    reporter.log(metrics)                            # rank 0: TensorBoard / metrics.jsonl / MLflow / W&B + one line

Per-step metrics go to the trackers from rank 0 directly, never through `ray.train.report`: each report blocks until
Ray Train's controller polls its workers (every 2 s by default), so reporting every logged step capped a run at
about 2 s per step. `ray.train.report` is called only where Ray needs it: with a checkpoint (save steps and the
end; Ray keeps and retains checkpoints, and resumes from them) and with an evaluation (Tune's ASHA compares trials
on evaluation reports; Tune trials save at every evaluation, so every evaluation carries a checkpoint).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .metrics import ThroughputMeter, Trackers, format_duration, format_log_line


@dataclass(frozen=True)
class StepActions:
    log: bool  # all-reduce the window's loss, write the metrics (rank 0), print the progress line
    evaluate: bool  # run the eval split
    save: bool  # write a checkpoint (every rank: ZeRO gathers are collectives)
    report: bool  # ray.train.report (every rank: it is a barrier), with the checkpoint when saving


def step_actions(t, step: int, has_eval: bool) -> StepActions:
    """What step `step` (1-based, after its optimizer update) does; `t` is the config's TrainConfig."""
    last = step == t.max_steps
    evaluate = has_eval and (step % t.eval_steps == 0 or last)
    save = step % t.save_steps == 0 or last
    report = save or evaluate
    return StepActions(log=report or step % t.logging_steps == 0, evaluate=evaluate, save=save, report=report)


class Progress:
    """Rank 0's progress lines, each prefixed with the time since the worker started: what a long phase is doing
    is printed before it starts (model load, DeepSpeed init, first step), so a slow phase is never silent."""

    def __init__(self, rank: int, clock=time.time):
        self.rank, self.clock, self.t0 = rank, clock, clock()

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def __call__(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[{format_duration(self.elapsed())}] {msg}", flush=True)


class StepReporter:
    """The window of steps since the last logged one: loss sum and label tokens, throughput (the meter)."""

    def __init__(self, meter: ThroughputMeter, trackers: Optional[Trackers], rank: int, world: int, max_steps: int,
                 progress: Optional[Progress] = None, clock=time.perf_counter):
        self.meter, self.trackers, self.rank, self.world = meter, trackers, rank, world
        self.max_steps, self.progress, self.clock = max_steps, progress, clock
        self.window = torch.zeros(2, dtype=torch.float64)  # local loss sum, GLOBAL label tokens
        self.device_loss = None  # the window's loss sum as the steps gave it (a device tensor: no per-step sync)
        self.lr = float("nan")
        self.first_step: Optional[int] = None
        self.loop_start = clock()

    def start(self, step: int) -> None:
        """The training loop starts at `step` (0, or the resumed step): the clocks for rates and the ETA start."""
        self.first_step, self.loop_start = step, self.clock()
        self.meter.start()

    def add_step(self, loss_sum, counts, step_s: float, wait_s: float, lr: float) -> None:
        """`loss_sum`: a float, or a 0-dim tensor on the device, summed there (read at the next log step)."""
        self.device_loss = loss_sum if self.device_loss is None else self.device_loss + loss_sum
        self.window[1] += counts.label_tokens  # counts are global already; the loss sum is reduced at log time
        self.lr = lr
        self.meter.add_step(counts, step_s, wait_s)

    def window_metrics(self, engine, state) -> dict[str, Any]:
        """The window's metrics (collective: the loss sum is all-reduced), then a new window starts."""
        from .grad_norm import grad_norm
        from .worker import all_reduce

        if self.device_loss is not None:
            self.window[0] += float(self.device_loss)
            self.device_loss = None
        loss_sum = float(all_reduce(self.window[:1].clone(), engine.device)[0])
        grad = grad_norm(engine)
        metrics: dict[str, Any] = {"step": state.step, "epoch": state.epoch,
                                   "loss": loss_sum / max(float(self.window[1]), 1.0),
                                   "grad_norm": grad if grad is not None else float("nan"),
                                   "lr": self.lr, "tokens_seen": state.tokens_seen, **self.meter.snapshot(),
                                   **self.meter.run_means()}
        self.window.zero_()
        return metrics

    def eta_s(self, step: int) -> Optional[float]:
        done = step - (self.first_step or 0)
        if done <= 0:
            return None
        return (self.clock() - self.loop_start) / done * (self.max_steps - step)

    def log(self, metrics: dict) -> None:
        """Rank 0: the trackers (TensorBoard, metrics.jsonl, ...) and one progress line. No Ray call."""
        if self.rank != 0:
            return
        step = int(metrics["step"])
        if self.trackers is not None:
            self.trackers.log(metrics, step)
        elapsed = self.progress.elapsed() if self.progress else None
        print(format_log_line(metrics, self.max_steps, elapsed, self.eta_s(step)), flush=True)


def report_to_ray(engine, model, metrics: dict, state, config: dict, rank: int, save: bool) -> None:
    """One `ray.train.report` on every rank, with this step's checkpoint when `save` (see the module docstring)."""
    import tempfile

    import ray.train

    from .checkpoint import save_checkpoint

    metrics = {k: v for k, v in metrics.items() if v is not None}
    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ckpt_") as tmp:
        save_checkpoint(engine, model, tmp, state, config, rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_step_{state.step:07d}")
