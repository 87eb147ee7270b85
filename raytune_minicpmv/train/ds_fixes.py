"""Fixes to DeepSpeed's hot path that keep its results and drop host synchronisations; applied by build_engine.

    from raytune_minicpmv.train.ds_fixes import apply_ds_fixes
    applied = apply_ds_fixes()   # before deepspeed.initialize; idempotent; returns the names of the fixes applied

* **One host sync for the overflow check, not one per tensor.** DeepSpeed's mixed-precision optimizer without
  ZeRO (`FP16_Optimizer`, which ZeRO-0 bf16 / fp16 uses) checks each gradient for inf/NaN before every step in
  `CheckOverflow.has_overflow_serial`: `if p.grad is not None and has_inf_or_nan(p.grad)` takes the truth value of
  a device tensor, one device-to-host synchronisation per trainable tensor (618 for the 2.6 recipe: LoRA q/k/v,
  vision tower, resampler). Each one drains the GPU's queue, so the host stops running ahead of the GPU; the
  profile of the fastest user-path setting showed 665 syncs per step (docs/PERFORMANCE.md). The replacement
  reduces every tensor's flag on its device and reads one bool: the same answer (some gradient holds inf/NaN).

* **The ZeRO-0 bf16 / fp16 step over all tensors at once.** That optimizer (`FP16_UnfusedOptimizer`: DeepSpeed
  picks it for any optimizer but its own FusedAdam) walks the trainable tensors one by one several times a step:
  the overflow check, a norm of each gradient (an fp32 copy, a norm, a power, an add), an fp32 copy of each
  gradient, the unscale/clip multiply, the copy back to bf16: about 13 operations per tensor, 8,000 for the 2.6
  recipe, each a kernel launch and ~10 µs of host time. The replacement copies each gradient to fp32 once and
  does the rest with torch's multi-tensor `_foreach` kernels: the same steps in the same order (skip the step
  when the global norm is not finite, clip by the global norm of the fp32 gradients, the wrapped optimizer's step
  on the fp32 master weights, copy them back), one host sync. Setups it does not cover (model or pipeline
  parallelism, MoE, DeepSpeed without `loss_scale_config`) keep DeepSpeed's own step.

* **ZeRO-3's debug prints that print nothing ask for nothing.** `partition_parameters.print_rank_0(message,
  debug=False, force=False)` asks the process group for the rank before it looks at its flags, and ZeRO-3 calls it
  with both flags off ~6,000 times a step for the 2.6 recipe (every partition and gather of a parameter): ~30 ms
  of host time a step in a CPU profile. The replacement looks at the flags first: the same prints.

* **ZeRO-3 lists a module's parameters once, not at every gather and release.** Its coordinator asks
  `module.named_parameters(recurse=...)` each time it fetches, releases or re-partitions a module: a walk of the
  module tree, and for a leaf layer (deepspeed.zero3_leaf_layers) of every submodule of the layer (LoRA's dicts,
  dropouts, ...). ~50,000 walks a step for the 2.6 recipe, ~80 ms of host time a step in a CPU profile. The
  replacement remembers each module's own list (the modules and their parameters are fixed once the engine is
  built) and still asks for the external parameters (registered during the forward) every time.

`RAYTUNE_MINICPMV_DS_FIXES=0` leaves DeepSpeed as it is (to measure a fix, or to rule one out).
"""
from __future__ import annotations

import itertools
import math
import os
import weakref

import torch

ENV = "RAYTUNE_MINICPMV_DS_FIXES"


def any_non_finite(tensors) -> bool:
    """Whether any tensor holds inf or NaN: one reduction pair per tensor on its device, one host read in all.

    max propagates NaN and exposes +inf, min exposes -inf: two scalars per tensor, nothing the tensor's size.
    """
    flags = [torch.isfinite(t.amax()).logical_and(torch.isfinite(t.amin())).logical_not()
             for t in tensors if t.numel()]
    if not flags:
        return False
    devices = {f.device for f in flags}
    if len(devices) > 1:  # (never in one engine; stay correct anyway)
        flags = [f.cpu() for f in flags]
    return bool(torch.stack(flags).any())


def _has_overflow_serial(self, params) -> bool:  # CheckOverflow's method, same contract
    return any_non_finite([p.grad.data for p in params if p.grad is not None])


_ORIGINAL: dict = {}  # each replacement below -> DeepSpeed's own function it stands in for
_OWN_PARAMETERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _get_all_parameters(sub_module, recurse=False):  # partitioned_param_coordinator.get_all_parameters, same pairs
    lists = _OWN_PARAMETERS.get(sub_module)
    if lists is None:
        lists = _OWN_PARAMETERS[sub_module] = {}
    own = lists.get(recurse)
    if own is None:
        own = lists[recurse] = tuple(sub_module.named_parameters(recurse=recurse))
    return itertools.chain(own, sub_module.ds_external_parameters())


def _print_rank_0(message, debug=False, force=False):  # partition_parameters.print_rank_0, same prints
    if debug or force:
        import deepspeed.comm as dist

        if dist.get_rank() == 0:
            print(message)


def _covered(opt) -> bool:
    """Whether the multi-tensor step reproduces DeepSpeed's for this optimizer (decided once per optimizer)."""
    if not hasattr(opt, "_rtm_covered"):
        from deepspeed.moe.utils import is_moe_param

        params = [p for g in opt.fp16_groups for p in g]
        opt._rtm_covered = (not opt.fused_lamb_legacy and opt.mpu is None and hasattr(opt, "loss_scale_config")
                            and not opt.custom_loss_scaler and not any(is_moe_param(p) for p in params)
                            and not any(getattr(p, "ds_pipe_replicated", False) for p in params))
    return opt._rtm_covered


@torch.no_grad()
def _unfused_step(self, closure=None):  # FP16_UnfusedOptimizer.step, same contract
    if closure is not None or not _covered(self):
        return _ORIGINAL[_unfused_step](self, closure)
    lp = [p for g in self.fp16_groups for p in g]
    hp = [p for g in self.fp32_groups for p in g]
    # DeepSpeed gives a trainable tensor without a gradient a zero fp32 gradient (its moments still decay)
    grads = [q.grad.to(p.dtype) if q.grad is not None else torch.zeros_like(p) for q, p in zip(lp, hp)]
    # inf / NaN in any gradient makes the global norm non-finite: DeepSpeed's overflow check and its invalid-norm
    # check, both at once; fp32 norms of the fp32 copies are what get_weight_norm computes (p.grad.float().norm())
    total = float(torch.stack(torch._foreach_norm(grads)).square().sum().sqrt()) if grads else 0.0
    if not math.isfinite(total):
        return self._skip_invalid_grad_norm()
    self.overflow = False
    self._global_grad_norm = total
    self._update_scale(False)
    cur = self.loss_scale_config.cur_scale
    combined = cur
    if self.clip_grad > 0.0:  # the norm is of the scaled gradients: as unscale_and_clip_grads
        clip = ((total / cur) + 1e-6) / self.clip_grad
        if clip > 1:
            combined = clip * cur
    torch._foreach_mul_(grads, 1.0 / combined)
    for p, g in zip(hp, grads):
        p.grad = g
    self.optimizer.step()
    for p in hp:
        p.grad = None
    torch._foreach_copy_([q.data for q in lp], hp)
    return self.overflow


def _targets() -> list[tuple]:
    """(owner, attribute, replacement) of each fix, DeepSpeed imported on use."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.utils import CheckOverflow
    from deepspeed.runtime.zero import partition_parameters, partitioned_param_coordinator as coordinator

    return [(CheckOverflow, "has_overflow_serial", _has_overflow_serial),
            (FP16_UnfusedOptimizer, "step", _unfused_step),
            (partition_parameters, "print_rank_0", _print_rank_0),
            (coordinator, "get_all_parameters", _get_all_parameters)]


def apply_ds_fixes() -> list[str]:
    """Apply the fixes above to the imported DeepSpeed (once per process); the names of those in place."""
    if os.environ.get(ENV, "1") == "0":
        return []
    for owner, name, fix in _targets():
        if getattr(owner, name) is not fix:
            _ORIGINAL[fix] = getattr(owner, name)
            setattr(owner, name, fix)
    _OWN_PARAMETERS.clear()  # a new engine: its modules are listed afresh
    return ["overflow check: one host sync", "ZeRO-0 bf16/fp16 step: multi-tensor",
            "ZeRO-3 silent prints: no rank query", "ZeRO-3 parameter lists: once per module"]


def remove_ds_fixes() -> None:
    """DeepSpeed's own code back in place (benchmarks/optimizer_step.py measures both in one process)."""
    for owner, name, fix in _targets():
        if getattr(owner, name) is fix:
            setattr(owner, name, _ORIGINAL[fix])
