"""`train --profile`'s summary (train/profiling.py): the step phases and the top host operators, per step."""
import os
import re

import torch
from torch.profiler import ProfilerActivity, profile

from raytune_minicpmv.train.profiling import phase, summarize

TORCH = os.path.dirname(torch.__file__)


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
    step = E(name="aten::item", stack=[f"{TORCH}/_tensor.py(10): item",
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


def test_kernel_time_is_booked_to_its_launch_site():
    """Kernels exist only on a GPU: stand-in events with the profiler's attribute names (a CPU operator's
    `kernels`, linked by correlation id; `cpu_parent`; Python `stack`)."""
    from types import SimpleNamespace as E

    from raytune_minicpmv.train.profiling import kernel_source_lines

    def k(name, us):
        return E(name=name, device=0, duration=us)

    fwd = E(name="aten::transpose", stack=[f"{TORCH}/nn/functional.py(5): f",
                                           "/repo/raytune_minicpmv/models/vision.py(124): grouped_attention"],
            cpu_parent=None, kernels=[])
    copy_fwd = E(name="aten::copy_", stack=[], cpu_parent=fwd, kernels=[k("elementwise_kernel<128, 4>", 300.0)] * 2)
    node = E(name="autograd::engine::evaluate_function: CatBackward0", stack=[], cpu_parent=None, kernels=[])
    copy_bwd = E(name="aten::copy_", stack=[], cpu_parent=node, kernels=[k("elementwise_kernel<128, 4>", 500.0)])
    bare = E(name="aten::mm", stack=[], cpu_parent=None, kernels=[k("nvjet_gemm", 100.0)])
    out = kernel_source_lines([fwd, copy_fwd, node, copy_bwd, bare, E(name="cudaLaunchKernel")], steps=2)
    assert out[0].startswith("kernel time by launch site (ms per step")
    assert out[1] == ("       0.3 ms     1.0x  elementwise_kernel<128, 4> <- aten::copy_ <- "
                      "/repo/raytune_minicpmv/models/vision.py(124): grouped_attention")
    assert out[2] == "       0.2 ms     0.5x  elementwise_kernel<128, 4> <- aten::copy_ <- backward CatBackward0"
    assert out[3] == "       0.1 ms     0.5x  nvjet_gemm <- aten::mm <- (no Python frame)"
    assert len(out) == 4


def test_a_synchronisation_in_the_backward_names_its_autograd_node():
    from types import SimpleNamespace as E

    from raytune_minicpmv.train.profiling import sync_lines

    span = E(start=0.0, end=1000.0)
    node = E(name="autograd::engine::evaluate_function: VarlenAttnBackward", stack=[], cpu_parent=None)
    copy = E(name="aten::copy_", stack=[], cpu_parent=node)
    out = sync_lines([E(name="cudaStreamSynchronize", stack=[], cpu_parent=copy, time_range=span)], steps=1)
    assert out[1] == "      1.0x      1.0 ms  backward VarlenAttnBackward"


def test_a_synchronisation_without_python_frames_lists_the_operators_above_it():
    from types import SimpleNamespace as E

    from raytune_minicpmv.train.profiling import sync_lines

    span = E(start=0.0, end=1000.0)
    node = None
    for name in ["step.forward", "CompiledFunction", "aten::to", "aten::_to_copy", "aten::copy_", "aten::copy_"]:
        node = E(name=name, stack=[], cpu_parent=node)
    out = sync_lines([E(name="cudaStreamSynchronize", stack=[], cpu_parent=node, time_range=span)], steps=1)
    assert out[1] == ("      1.0x      1.0 ms  (no Python frame; under "
                      "aten::copy_ < aten::copy_ < aten::_to_copy < ... < step.forward)")


def test_frames_of_packages_in_an_environment_under_a_torch_folder_still_count():
    """The GPU machine's environment lives in /opt/torch/.venv: only torch's own frames are skipped."""
    from types import SimpleNamespace as E

    from raytune_minicpmv.train.profiling import sync_lines

    span = E(start=0.0, end=1000.0)
    liger = "/opt/torch/.venv/lib/python3.12/site-packages/liger_kernel/ops/fused_linear_cross_entropy.py(80): fwd"
    op = E(name="aten::item", stack=[f"{TORCH}/_tensor.py(10): item", liger], cpu_parent=None)
    out = sync_lines([E(name="cudaStreamSynchronize", stack=[], cpu_parent=op, time_range=span)], steps=1)
    assert out[1] == "      1.0x      1.0 ms  " + liger
