"""`train --profile` (train.profile_steps > 0): a torch profiler trace of a few steps of the real training loop.

    raytune-minicpmv train --config configs/minicpmv26_lora_recommended.yaml --profile    # 5 steps
    raytune-minicpmv train --config ... train.profile_steps=10

The profiler is attached to the DeepSpeed engine (`attach_profiler`, called by train.build_engine): it advances at
every `engine.step()` (one per micro-batch), skips the first `WARMUP_STEPS` steps (first-step compilation,
allocator growth, cuDNN plan building), records `profile_steps` steps and then stops. Each rank writes a Chrome /
Perfetto trace `<run dir>/profile/trace_rank<R>.json` (open it in https://ui.perfetto.dev); rank 0 prints:

* the top kernels by GPU time (name, calls, total ms, % of kernel time);
* GPU idle %: 1 − (union of the intervals in which at least one kernel or copy ran) / (wall time of the recorded
  steps). A high idle % with a short kernel time means the host (Python, launches, ZeRO bookkeeping, data wait,
  synchronisations) bounds the step, not the GPU.

On CPU there are no kernels: the summary lists the top CPU operators instead, and the idle % is not reported.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from ..config import Config, is_uri, join_uri

log = logging.getLogger(__name__)
WARMUP_STEPS = 3


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
            print(f"profile of {n} steps: trace {path}\n" + summarize(prof), flush=True)

    prof = profile(activities=activities, schedule=schedule(wait=0, warmup=WARMUP_STEPS, active=n, repeat=1),
                   on_trace_ready=on_ready, record_shapes=False, with_stack=False)
    prof.start()
    inner = engine.step
    state = {"steps": 0}

    def step(*args, **kwargs):
        out = inner(*args, **kwargs)
        if state["steps"] <= WARMUP_STEPS + n:  # past the window: the profiler is stopped, no per-step cost
            state["steps"] += 1
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the recorded step's kernels belong to it
            prof.step()
            if state["steps"] == WARMUP_STEPS + n:
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


def summarize(prof, top: int = 15) -> str:
    """Top kernels by GPU time and the GPU idle % of the recorded window (CPU: top operators)."""
    events = list(prof.events())
    kernels = [e for e in events if _is_device(e)]
    if not kernels:
        rows = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)[:top]
        lines = ["top CPU operators (self time):"]
        lines += [f"  {r.self_cpu_time_total / 1e3:9.1f} ms {r.count:6d}x  {r.key[:90]}" for r in rows]
        return "\n".join(lines)
    busy_us = union_length([(e.time_range.start, e.time_range.end) for e in kernels])
    span = [(e.time_range.start, e.time_range.end) for e in events if e.time_range.end > e.time_range.start]
    wall_us = max(end for _, end in span) - min(start for start, _ in span)
    totals: dict[str, list] = {}
    for e in kernels:
        t = totals.setdefault(e.name, [0.0, 0])
        t[0] += e.time_range.end - e.time_range.start
        t[1] += 1
    kernel_us = sum(t for t, _ in totals.values())
    lines = [f"GPU idle {100 * (1 - busy_us / max(wall_us, 1e-9)):.1f}% of {wall_us / 1e3:.0f} ms "
             f"(kernels busy {busy_us / 1e3:.0f} ms)", "top kernels (GPU time):"]
    for name, (t, c) in sorted(totals.items(), key=lambda kv: kv[1][0], reverse=True)[:top]:
        lines.append(f"  {t / 1e3:9.1f} ms {100 * t / max(kernel_us, 1e-9):5.1f}% {c:6d}x  {name[:90]}")
    return "\n".join(lines)


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
