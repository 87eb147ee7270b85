"""`train --profile` (train.profile_steps > 0): a torch profiler trace of a few steps of the real training loop.

    raytune-minicpmv train --config configs/minicpmv26_lora_recommended.yaml --profile    # 5 steps
    raytune-minicpmv train --config ... train.profile_steps=10

The profiler is attached to the DeepSpeed engine (`attach_profiler`, called by train.build_engine): it advances at
every `engine.step()` (one per micro-batch), skips the first `WARMUP_STEPS` steps (first-step compilation,
allocator growth, cuDNN plan building), records `profile_steps` steps and then stops. Each rank writes a Chrome /
Perfetto trace `<run dir>/profile/trace_rank<R>.json` (open it in https://ui.perfetto.dev); rank 0 prints:

* the top kernels by GPU time (name, calls, total ms, % of kernel time), then the same time by where it was
  launched: the operator and the first Python frame outside torch, or in the backward the autograd node (a copy
  kernel says nothing until one knows which transpose or cat it serves);
* GPU idle %: 1 − (union of the intervals in which at least one kernel or copy ran) / (wall time of the recorded
  steps). A high idle % with a short kernel time means the host (Python, launches, ZeRO bookkeeping, data wait,
  synchronisations) bounds the step, not the GPU.
* the step's phases (`phase(...)` ranges of `worker.train_step`: data, counts, to_device, forward, backward,
  optimizer): host ms per step in each and, on CUDA, the phase's span on the GPU timeline (its first to its last
  kernel). A phase whose host time is far above its GPU span is where the host bounds the step;
* the host synchronisations (each one drains the GPU's queue) by the first Python frame outside torch that
  caused them, per step (the trace records Python stacks for this);
* the top host operators by self time (kernel launches, synchronisations, copies), with their counts per step.

On CPU there are no kernels: the summary lists the phases and the top CPU operators, and the idle % is not reported.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from ..config import Config, is_uri, join_uri

log = logging.getLogger(__name__)
WARMUP_STEPS = 3
PHASE_PREFIX = "step."


def phase(name: str):
    """A named range of the training step in the profiler trace (`step.<name>`); next to nothing when no profiler
    records (one RecordFunction object)."""
    import torch

    return torch.profiler.record_function(PHASE_PREFIX + name)


def attach_profiler(engine, cfg: Config, rank: int) -> Optional[object]:
    """Wrap `engine.step` so a torch profiler records steps WARMUP+1 .. WARMUP+profile_steps; None when off."""
    n = cfg.train.profile_steps
    if n <= 0:
        return None
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    out_dir = _profile_dir(cfg)
    os.makedirs(out_dir, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])

    def on_ready(prof) -> None:
        path = os.path.join(out_dir, f"trace_rank{rank}.json")
        prof.export_chrome_trace(path)
        if rank == 0:
            print(f"profile of {n} steps: trace {path}\n" + summarize(prof, steps=n), flush=True)

    prof = profile(activities=activities, schedule=schedule(wait=0, warmup=WARMUP_STEPS, active=n, repeat=1),
                   on_trace_ready=on_ready, record_shapes=False, with_stack=True)  # stacks: who syncs
    prof.start()
    inner = engine.step
    state = {"steps": 0}

    def step(*args, **kwargs):
        out = inner(*args, **kwargs)
        if state["steps"] <= WARMUP_STEPS + n:  # past the window: the profiler is stopped, no per-step cost
            state["steps"] += 1
            closes = state["steps"] == WARMUP_STEPS + n
            # Synchronize only before the step that closes the window (its kernels must have run when the trace is
            # collected): a sync at every step would book the GPU's queue drain as `optimizer` host time (the
            # step's own Timer syncs at its end anyway).
            if closes and torch.cuda.is_available():
                torch.cuda.synchronize()
            prof.step()
            if closes:
                prof.stop()
        return out

    engine.step = step
    return prof


def _profile_dir(cfg: Config) -> str:
    run_dir = cfg.run_dir
    if is_uri(run_dir):
        import tempfile

        return os.path.join(tempfile.gettempdir(), "raytune_minicpmv_profile", cfg.run.name)
    return join_uri(run_dir, "profile")


def summarize(prof, top: int = 22, steps: int = 0) -> str:
    """Top kernels by GPU time, the GPU idle % of the recorded window, the step phases and the top host operators
    (CPU: phases and top operators). `steps` (the recorded steps) turns totals into per-step figures."""
    events = list(prof.events())
    averages = prof.key_averages()
    kernels = [e for e in events if _is_device(e)]
    lines = []
    if kernels:
        busy_us = union_length([(e.time_range.start, e.time_range.end) for e in kernels])
        span = [(e.time_range.start, e.time_range.end) for e in events if e.time_range.end > e.time_range.start]
        wall_us = max(end for _, end in span) - min(start for start, _ in span)
        totals: dict[str, list] = {}
        for e in kernels:
            t = totals.setdefault(e.name, [0.0, 0])
            t[0] += e.time_range.end - e.time_range.start
            t[1] += 1
        kernel_us = sum(t for t, _ in totals.values())
        lines += [f"GPU idle {100 * (1 - busy_us / max(wall_us, 1e-9)):.1f}% of {wall_us / 1e3:.0f} ms "
                  f"(kernels busy {busy_us / 1e3:.0f} ms, {len(kernels)} kernels and copies)", "top kernels (GPU time):"]
        for name, (t, c) in sorted(totals.items(), key=lambda kv: kv[1][0], reverse=True)[:top]:
            lines.append(f"  {t / 1e3:9.1f} ms {100 * t / max(kernel_us, 1e-9):5.1f}% {c:6d}x  {name[:90]}")
        lines += kernel_source_lines(events, steps, top)
    lines += phase_lines(averages, steps)
    lines += sync_lines(events, steps)
    per = max(steps, 1)
    host = sorted((a for a in averages if not a.key.startswith(PHASE_PREFIX) and not a.key.startswith("ProfilerStep")),
                  key=lambda a: a.self_cpu_time_total, reverse=True)[:top]
    lines.append(f"top host operators (self CPU time{' per step' if steps else ''}):")
    lines += [f"  {a.self_cpu_time_total / 1e3 / per:9.1f} ms {a.count / per:8.0f}x  {a.key[:90]}" for a in host]
    return "\n".join(lines)


def phase_lines(averages, steps: int) -> list[str]:
    """The `phase(...)` ranges per recorded step (totals if steps=0): host ms inside the range, and on CUDA the
    range's span on the GPU timeline (kineto mirrors each range there, from its first to its last kernel)."""
    host: dict[str, list] = {}
    gpu: dict[str, float] = {}
    for a in averages:
        if not a.key.startswith(PHASE_PREFIX):
            continue
        name = a.key[len(PHASE_PREFIX):]
        if a.cpu_time_total > 0:
            host[name] = [a.cpu_time_total, a.count]
        else:  # the GPU-timeline copy of the range
            gpu[name] = getattr(a, "device_time_total", getattr(a, "cuda_time_total", 0.0))
    if not host:
        return []
    per = max(steps, 1)
    out = [f"step phases ({'ms per step' if steps else 'ms in all'}: host time in it"
           f"{', its span on the GPU' if gpu else ''}):"]
    for name, (t, count) in sorted(host.items(), key=lambda kv: kv[1][0], reverse=True):
        span = f"   GPU {gpu[name] / 1e3 / per:8.1f}" if name in gpu else ""
        out.append(f"  {name:<10} host {t / 1e3 / per:8.1f}{span}   {count / per:4.0f}x")
    return out


def kernel_source_lines(events, steps: int, top: int = 22) -> list[str]:
    """GPU time by launching site: each CPU operator's kernels (the profiler links them by correlation id) grouped
    by (kernel, operator, origin), origin being the first Python frame outside torch or, on the backward thread,
    the autograd node that ran the operator. Per recorded step."""
    sites: dict[tuple[str, str, str], list] = {}
    for e in events:
        for k in getattr(e, "kernels", None) or ():
            c = sites.setdefault((k.name, e.name, _origin(e) or "(no Python frame)"), [0.0, 0])
            c[0] += k.duration
            c[1] += 1
    if not sites:
        return []
    per = max(steps, 1)
    out = [f"kernel time by launch site ({'ms per step' if steps else 'ms in all'}: kernel <- operator <- origin):"]
    for (kernel, op, where), (us, n) in sorted(sites.items(), key=lambda kv: kv[1][0], reverse=True)[:top]:
        out.append(f"  {us / 1e3 / per:8.1f} ms {n / per:7.1f}x  {kernel[:48]} <- {op[:32]} <- {where[:90]}")
    return out


def _origin(e) -> Optional[str]:
    """The first Python frame outside torch on the way up from E or, on the autograd thread (no Python frames), the
    autograd node that ran it; None when neither."""
    node = e
    while node is not None:
        if node.name.startswith(AUTOGRAD_NODE):
            return "backward " + node.name[len(AUTOGRAD_NODE):].strip()
        frames = [f for f in (getattr(node, "stack", None) or []) if not _in_torch(f)]
        if frames:
            return frames[0]
        node = getattr(node, "cpu_parent", None)
    return None


def _in_torch(frame: str) -> bool:
    """A frame of torch's own code (or a builtin). By torch's install folder: a "/torch/" substring also matched
    every package of an environment installed under e.g. /opt/torch/.venv (the GPU machine's), hiding the frames
    of transformers, PEFT and Liger."""
    import torch

    return frame.startswith(os.path.dirname(torch.__file__) + os.sep) or "<built-in" in frame


AUTOGRAD_NODE = "autograd::engine::evaluate_function:"
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def sync_lines(events, steps: int, top: int = 8) -> list[str]:
    """Host synchronisations (each drains the GPU's queue) by the first Python frame outside torch that led to
    them (the trace is recorded with stacks) or the autograd node whose backward made them, per recorded step."""
    counts: dict[str, list] = {}
    for e in events:
        if e.name not in SYNC_CALLS:
            continue
        where = _caller(e)
        c = counts.setdefault(where, [0, 0.0])
        c[0] += 1
        c[1] += e.time_range.end - e.time_range.start
    if not counts:
        return []
    per = max(steps, 1)
    out = [f"host synchronisations ({'per step' if steps else 'in all'}, by caller):"]
    for where, (n, us) in sorted(counts.items(), key=lambda kv: kv[1][0], reverse=True)[:top]:
        out.append(f"  {n / per:7.1f}x {us / 1e3 / per:8.1f} ms  {where[:110]}")
    return out


def _caller(e) -> str:
    where = _origin(e)
    if where is not None:
        return where
    chain, node = [], getattr(e, "cpu_parent", None)
    while node is not None:  # the operators above it, innermost first: which op of which range made the sync
        chain.append(node.name)
        node = getattr(node, "cpu_parent", None)
    return f"(no Python frame; under {' < '.join(_shorten(chain)) if chain else 'nothing'})"


def _shorten(chain: list[str], keep: int = 5) -> list[str]:
    return chain if len(chain) <= keep else chain[:keep - 2] + ["..."] + chain[-1:]


def _is_device(e) -> bool:
    """A kernel or copy on the GPU; not the profiler's own step annotations (`ProfilerStep#N`), which kineto also
    puts on the GPU timeline spanning the whole step (counting them reads as 0 % idle)."""
    from torch.autograd import DeviceType

    if getattr(e, "device_type", None) != DeviceType.CUDA:
        return False
    return not (getattr(e, "is_user_annotation", False) or e.name.startswith("ProfilerStep"))


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals (overlaps, e.g. concurrent streams, counted once)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total
