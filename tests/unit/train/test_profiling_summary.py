"""`train --profile`'s summary (train/profiling.py): the step phases and the top host operators, per step."""
import re

import torch
from torch.profiler import ProfilerActivity, profile

from raytune_minicpmv.train.profiling import phase, summarize


def _profiled_steps(steps: int):
    x = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with phase("forward"):
                y = x @ x
            with phase("optimizer"):
                for _ in range(3):
                    y = y.add(1.0)
    return prof


def test_summary_lists_each_phase_per_step_and_the_host_operators():
    out = summarize(_profiled_steps(4), steps=4)
    assert "step phases (ms per step: host time in it):" in out
    rows = dict(re.findall(r"^  (forward|optimizer)\s+host .*?(\d+)x$", out, re.M))
    assert rows == {"forward": "1", "optimizer": "1"}  # one range each per step: the counts are per step
    ops = dict((name.strip(), int(n)) for n, name in re.findall(r"^ +[\d.]+ ms +(\d+)x  (aten::\w+)$", out, re.M))
    assert ops["aten::add"] == 3 and ops["aten::mm"] == 1  # 12 adds over 4 steps = 3 a step
    assert "GPU idle" not in out  # no kernels on CPU


def test_summary_without_steps_gives_totals():
    out = summarize(_profiled_steps(2))
    assert "step phases (ms in all" in out
    assert re.search(r"^  optimizer\s+host .* 1x$", out, re.M) is None
    assert re.search(r"^  optimizer\s+host .* 2x$", out, re.M)


def test_synchronisations_are_counted_by_the_first_frame_outside_torch():
    """CUDA sync events exist only on a GPU; their attribution is a walk up the event tree (stand-in events with
    the profiler's attribute names)."""
    from types import SimpleNamespace as E

    from raytune_minicpmv.train.profiling import sync_lines

    span = E(start=0.0, end=2000.0)
    step = E(name="aten::item", stack=["/site/torch/_tensor.py(10): item",
                                       "/repo/raytune_minicpmv/models/modeling.py(171): embed_inputs"],
             cpu_parent=None)
    deep = E(name="aten::_local_scalar_dense", stack=[], cpu_parent=step)
    events = [E(name="cudaStreamSynchronize", stack=[], cpu_parent=deep, time_range=span) for _ in range(4)]
    events += [E(name="cudaStreamSynchronize", stack=[], cpu_parent=None, time_range=span),
               E(name="cudaLaunchKernel", stack=[], cpu_parent=None, time_range=span)]
    out = sync_lines(events, steps=2)
    assert out[0] == "host synchronisations (per step, by caller):"
    assert out[1] == "      2.0x      4.0 ms  /repo/raytune_minicpmv/models/modeling.py(171): embed_inputs"
    assert out[2] == "      0.5x      1.0 ms  (no Python frame; under nothing)"
    assert len(out) == 3  # the kernel launch is not a synchronisation
