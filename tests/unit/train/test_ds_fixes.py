"""train/ds_fixes.py: DeepSpeed's overflow check gives the same answers with one host read instead of one per tensor.

The host read is counted as calls of `torch.Tensor.__bool__` (what `if tensor:` and `bool(tensor)` run; on a GPU
each one is a device-to-host synchronisation).
"""
from __future__ import annotations

import pytest
import torch

from raytune_minicpmv.train import ds_fixes


class _P:  # what CheckOverflow reads of a parameter: .grad
    def __init__(self, grad):
        self.grad = grad


def _params(n=40, bad=None, bad_at=None):
    ps = [_P(torch.randn(8, 5)) for _ in range(n)]
    ps.insert(3, _P(None))  # a frozen / unused parameter: no gradient
    if bad is not None:
        ps[bad_at].grad[1, 2] = bad
    return ps


@pytest.fixture
def bool_calls(monkeypatch):
    calls = []
    original = torch.Tensor.__bool__

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", counting)
    return calls


@pytest.fixture
def fixed(monkeypatch):
    from deepspeed.runtime.utils import CheckOverflow

    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    monkeypatch.setattr(CheckOverflow, "has_overflow_serial", CheckOverflow.has_overflow_serial)  # undone after
    monkeypatch.setattr(FP16_UnfusedOptimizer, "step", FP16_UnfusedOptimizer.step)
    from deepspeed.runtime.zero import partition_parameters

    monkeypatch.setattr(partition_parameters, "print_rank_0", partition_parameters.print_rank_0)
    from deepspeed.runtime.zero import partitioned_param_coordinator

    monkeypatch.setattr(partitioned_param_coordinator, "get_all_parameters",
                        partitioned_param_coordinator.get_all_parameters)
    monkeypatch.delenv(ds_fixes.ENV, raising=False)
    assert "overflow check: one host sync" in ds_fixes.apply_ds_fixes()
    return CheckOverflow(param_groups=None)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("bad_at", [0, 20, -1])
def test_the_fixed_check_finds_every_non_finite_value(fixed, bad, bad_at):
    assert fixed.has_overflow_serial(_params(bad=bad, bad_at=bad_at)) is True


def test_the_fixed_check_passes_finite_gradients(fixed):
    ps = _params()
    ps[5].grad[0, 0] = torch.finfo(torch.float32).max  # large, still finite
    ps.append(_P(torch.zeros(0)))  # an empty gradient holds nothing non-finite
    assert fixed.has_overflow_serial(ps) is False
    assert fixed.has_overflow_serial([_P(None)]) is False


def test_the_fixed_check_reads_the_device_once(fixed, bool_calls):
    """DeepSpeed's own check reads one flag per gradient (40 here); the fix reads one for all of them."""
    assert fixed.has_overflow_serial(_params(n=40)) is False
    assert len(bool_calls) == 1


def test_deepspeeds_own_check_reads_once_per_tensor(bool_calls, monkeypatch):
    """The control: what the fix removes is there in the installed DeepSpeed (if this fails, the fix may go)."""
    from deepspeed.runtime.utils import CheckOverflow

    own = CheckOverflow.has_overflow_serial
    if own is ds_fixes._has_overflow_serial:  # an earlier build_engine in this process applied the fix: the original
        own = ds_fixes._ORIGINAL[ds_fixes._has_overflow_serial]
    assert own(CheckOverflow(param_groups=None), _params(n=40)) is False
    assert len(bool_calls) == 40


def test_the_switch_leaves_deepspeed_alone(monkeypatch):
    from deepspeed.runtime.utils import CheckOverflow

    before = CheckOverflow.has_overflow_serial
    monkeypatch.setenv(ds_fixes.ENV, "0")
    assert ds_fixes.apply_ds_fixes() == []
    assert CheckOverflow.has_overflow_serial is before


def test_zero3s_silent_prints_ask_for_no_rank_and_the_others_still_print(fixed, monkeypatch, capsys):
    """ZeRO-3 calls partition_parameters.print_rank_0 with debug and force off ~6,000 times a step; DeepSpeed's own
    asks the process group for the rank on each call before it looks at the flags."""
    import deepspeed.comm as dist
    from deepspeed.runtime.zero import partition_parameters

    asked = []
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: asked.append(1) or 0)
    for _ in range(5):
        partition_parameters.print_rank_0("not shown", force=False)
    assert asked == [] and capsys.readouterr().out == ""
    partition_parameters.print_rank_0("shown", force=True)
    partition_parameters.print_rank_0("shown too", debug=True)
    assert capsys.readouterr().out == "shown\nshown too\n" and len(asked) == 2
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 1)
    partition_parameters.print_rank_0("rank 1 prints nothing", force=True)
    assert capsys.readouterr().out == ""


def test_zero3s_parameter_lists_walk_each_module_once_and_keep_the_external_ones(fixed, monkeypatch):
    """ZeRO-3's coordinator lists a module's parameters (iter_params) at every fetch, release and re-partition: for
    a leaf layer a walk of all its submodules, ~50,000 walks a step for the 2.6 recipe."""
    from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator

    layer = torch.nn.Sequential(torch.nn.Linear(3, 4),
                                torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)))
    external = torch.nn.Parameter(torch.zeros(2))
    extras = []
    for m in layer.modules():  # what ZeRO-3 attaches to every module
        m.ds_external_parameters = (lambda: list(extras))
    walks = []
    original = torch.nn.Module._named_members  # what named_parameters runs: one call per listing

    def counting(self, *a, **k):
        walks.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(torch.nn.Module, "_named_members", counting)
    expected = [p for _, p in layer.named_parameters()]
    walks.clear()
    for _ in range(10):
        assert list(coordinator.iter_params(layer, recurse=True)) == expected
    assert list(coordinator.iter_params(layer, recurse=False)) == []  # its own: none (all in submodules)
    assert len(walks) == 2  # one walk per (module, recurse), not one per call
    extras.append(("ext", external))  # an external parameter registered during a forward: seen at once
    assert list(coordinator.iter_params(layer, recurse=True)) == expected + [external]


# --- the ZeRO-0 bf16 step: DeepSpeed's FP16_UnfusedOptimizer with and without the multi-tensor step -------------

@pytest.fixture(scope="module")
def world_of_one():
    """gloo, one rank (DeepSpeed's optimizers ask for the rank). Left up afterwards, like the engine tests leave
    theirs until their module ends: DeepSpeed's comm layer keeps the group, and a later engine in this process
    would find a destroyed one."""
    import os
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    if not dist.is_initialized():
        import deepspeed
        import deepspeed.comm.comm as ds_comm

        from deepspeed.utils import groups

        # a group an earlier module destroyed may still sit in DeepSpeed's comm layer and its group cache
        ds_comm.cdb, groups._WORLD_GROUP = None, None
        deepspeed.init_distributed(dist_backend="gloo")
    yield
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _engine(seed: int):
    """A ZeRO-0 bf16 DeepSpeed engine over a small model with torch AdamW (what train/engine.py builds): DeepSpeed
    wraps it in FP16_UnfusedOptimizer. CPU, gloo world of 1."""
    import deepspeed

    from raytune_minicpmv.config.loading import replace
    from raytune_minicpmv.config.schema import Config
    from raytune_minicpmv.train.engine import build_ds_config, build_optimizer

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 16),
                                torch.nn.LayerNorm(16), torch.nn.Linear(16, 3)).to(torch.bfloat16)
    model[2].weight.requires_grad_(False)  # a frozen tensor
    cfg = replace(Config(), deepspeed={"zero_stage": 0}, model={"dtype": "bf16"}, scaling={"use_gpu": False},
                  optim={"max_grad_norm": 0.5}, train={"micro_batch_size": 1})
    opt = build_optimizer(model, cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=build_ds_config(cfg))
    return engine


def _run(fixed: bool, monkeypatch, poison_step: int = 2):
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    monkeypatch.setattr(FP16_UnfusedOptimizer, "step", FP16_UnfusedOptimizer.step)  # undone after the test
    from deepspeed.runtime.utils import CheckOverflow

    monkeypatch.setattr(CheckOverflow, "has_overflow_serial", CheckOverflow.has_overflow_serial)
    if fixed:
        ds_fixes.apply_ds_fixes()
    else:
        ds_fixes.remove_ds_fixes()
    engine = _engine(0)
    assert isinstance(engine.optimizer, FP16_UnfusedOptimizer)
    g = torch.Generator().manual_seed(1)
    norms, overflows = [], []
    for step in range(4):
        x = torch.randn(8, 6, generator=g).to(torch.bfloat16) * 30  # large: clipping at 0.5 applies
        loss = engine(x).float().square().mean()
        if step == poison_step:  # a non-finite gradient: the step must be skipped
            loss = loss * float("inf")
        engine.backward(loss)
        engine.step()
        norms.append(engine.optimizer._global_grad_norm)
        overflows.append(engine.optimizer.overflow)
    weights = [p.detach().float().clone() for p in engine.module.parameters()]
    masters = [p.detach().clone() for grp in engine.optimizer.fp32_groups for p in grp]
    return norms, overflows, weights, masters


def test_the_multi_tensor_step_applies_deepspeeds_update(monkeypatch, world_of_one):
    """Same gradients in, the same clipped AdamW step out: bf16 weights, fp32 masters, reported norms, the skipped
    step with a non-finite gradient (clipping active at max_grad_norm 0.5, a frozen tensor, two decay groups)."""
    norms_ds, over_ds, w_ds, m_ds = _run(False, monkeypatch)
    norms_fx, over_fx, w_fx, m_fx = _run(True, monkeypatch)
    assert over_ds == over_fx == [False, False, True, False]
    assert norms_ds[2] == norms_fx[2] == float("inf")
    for a, b in zip(norms_ds[:2] + norms_ds[3:], norms_fx[:2] + norms_fx[3:]):
        assert a > 0.5 and abs(a - b) <= 1e-5 * a  # clipped steps; summation order differs in the last bits
    for a, b in zip(m_ds, m_fx):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(w_ds, w_fx):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)  # bf16 copies of the masters above


def test_the_multi_tensor_step_issues_fewer_operations(monkeypatch, world_of_one):
    """The point of the fix: DeepSpeed's step runs ~13 operations per trainable tensor; the replacement ~2 plus a
    few multi-tensor kernels. Counted with the profiler's operator events for one step."""
    from torch.profiler import ProfilerActivity, profile

    def ops_per_step(fixed: bool) -> int:
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

        monkeypatch.setattr(FP16_UnfusedOptimizer, "step", FP16_UnfusedOptimizer.step)
        ds_fixes.apply_ds_fixes() if fixed else ds_fixes.remove_ds_fixes()
        engine = _engine(0)
        engine.backward(engine(torch.randn(4, 6).to(torch.bfloat16)).float().sum())
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.step()
        return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))

    deepspeed_ops, fixed_ops = ops_per_step(False), ops_per_step(True)
    assert fixed_ops < deepspeed_ops / 2, (fixed_ops, deepspeed_ops)
