"""Prepare a model for DeepSpeed ZeRO-3 (partitioned parameters) before `deepspeed.initialize`.

    from raytune_minicpmv.models.zero3 import prepare_for_zero3
    leaves = prepare_for_zero3(model)      # a no-op for the 2.x families (their vision call is one per rank)
    engine, *_ = deepspeed.initialize(model=model, ...)

Under ZeRO-3 every call of a module all-gathers its parameters (and frees them after), and the gathers are
collectives: all ranks must call the same modules in the same order. transformers' 4.6 / 4.7 connector
(`model.merger`, `MiniCPMV4_6Merger` / `MiniCPMV4_7Merger`) runs its MLPs once per crop in a Python loop, so a rank
with 7 crops would gather them 7 times and a rank with 3 crops 3 times: the ranks fall out of step (gloo: "Received
data size doesn't match", or a hang). DeepSpeed's answer for such modules (MoE blocks, whose experts vary per
rank) is a *leaf module* (`deepspeed.utils.set_z3_leaf_modules`): its parameters are gathered once when the module
is entered and its children get no hooks, so the crop loop runs on gathered weights and each rank gathers the
connector exactly once per forward (a text-only micro-batch runs one dummy crop: models/forward.py).

DeepSpeed reduces a leaf module's gradients from a full backward hook on it, which needs two things this module
does not give by itself:
- ONE tensor as its output: the merger returns a *list* of per-crop features. A module's full backward hook does
  not look into a list (it would never fire and the connector's gradients would never be reduced), and
  DeepSpeed's pre-backward hook would run once per listed tensor (rank 0 with 3 crops records the connector 4
  times in its module trace, rank 1 with 5 crops 6 times: "disagreement on list length" at the next step). A
  forward hook returns the crops' features already concatenated, as a 1-tuple (every caller concatenates the
  merger's output along dim 0: the same tensor);
- an input that requires grad: otherwise PyTorch fires the hook when the output's gradient is known, before the
  connector's own weight gradients are computed (a frozen vision tower gives such an input); a forward pre-hook
  marks the input as requiring grad while the connector has trainable weights.
The rest of the 4.x model calls each module once per forward whatever the batch holds (the vision attention's
per-crop loop calls no module; the Gated-DeltaNet layers read `conv1d.weight` directly, which DeepSpeed gathers
on access as an external parameter of the layer, in the same order on every rank).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

ZERO3_LEAF_CLASSES = ("MiniCPMV4_6Merger", "MiniCPMV4_7Merger")  # modules whose inner calls vary per batch


def zero3_refusal(family: str, trainable) -> Optional[str]:
    """Why ZeRO-3 cannot train `family` with this trainable set (config.TrainableConfig), or None when it can: the
    one place that decides (validation refuses an explicit stage 3, engine_plan's `auto` never picks it).

    Every trained 4.x setup ran under ZeRO-3 in tests/integration/test_v4_zero3_mixed.py; with the LLM frozen
    (only the connector / vision trained) 2 CPU ranks hung twice, cause not found, so it is refused rather than
    left to hang a cluster. An unknown name is None here: model.family's own check reports it.
    """
    from .registry import FAMILIES

    fam = FAMILIES.get(family)
    if fam is None or not fam.hf_native or trainable.preset is not None or trainable.llm != "frozen":
        return None
    return "it hung in our 2-rank tests, cause not found"


def prepare_for_zero3(model: nn.Module, layer_leaves: bool = False) -> list[nn.Module]:
    """Mark the per-crop connector(s) of `model` (a PEFT model or a plain one) as ZeRO-3 leaf modules with the two
    hooks DeepSpeed's leaf gradient reduction needs; returns the leaves DeepSpeed will hook (none for 2.x).

    `layer_leaves` (deepspeed.zero3_leaf_layers, 2.x families): every element of a `layers` ModuleList (the LLM's
    decoder layers, the vision tower's encoder layers) becomes a leaf too. DeepSpeed's per-module bookkeeping
    (fetch, prefetch trace, release: ~0.5 ms of host time per module and pass on an H200,
    benchmarks/optimizer_step.py) then runs once per layer instead of once per linear / norm / LoRA matrix (15 in a
    2.6 LoRA decoder layer, 11 in a vision layer), in the forward, the recompute and the backward alike. DeepSpeed
    reduces a leaf's gradients from its full backward hook: the layers are called as modules and their input
    requires grad (the hooks below make sure of it).
    """
    from deepspeed.utils import set_z3_leaf_module, set_z3_leaf_modules

    set_z3_leaf_modules(model, list(ZERO3_LEAF_CLASSES), raise_if_not_found=False)
    if layer_leaves:
        for name, module in model.named_modules():
            # the LLM's decoder layers and the vision tower's encoder layers (`vpm.encoder.layers`): both towers call
            # every layer as a module (the packed vision path too: models/vision.NavitEncoderLayer), so a leaf
            # layer's hooks (the gather, the gradient reduction) fire on every pass. Not in PEFT's frozen
            # `original_module` beside a trained copy (modules_to_save): training never calls it
            if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers" \
                    and ".original_module." not in f".{name}.":
                for layer in module:
                    set_z3_leaf_module(layer, True)
    leaves = outermost_leaves(model)
    for module in leaves:
        # prepend: ahead of DeepSpeed's own hooks (registered later, in deepspeed.initialize), so DeepSpeed sees
        # the input that requires grad and the single output tensor
        module.register_forward_pre_hook(_input_requires_grad, prepend=True)
        module.register_forward_hook(_features_as_one_tensor, prepend=True)
    return leaves


def outermost_leaves(module: nn.Module) -> list[nn.Module]:
    """The leaf modules DeepSpeed hooks: it stops descending at the first module that reads as a leaf. Under PEFT
    that is the `ModulesToSaveWrapper` around the trained connector copy (it forwards attribute reads, the leaf flag
    included, to that copy), so the hooks belong on the wrapper: its input and output are what DeepSpeed sees."""
    from deepspeed.utils import z3_leaf_module

    if z3_leaf_module(module):
        return [module]
    return [leaf for child in module.children() for leaf in outermost_leaves(child)]


def _input_requires_grad(module: nn.Module, args: tuple):
    if not (torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor)) or args[0].requires_grad:
        return None
    if not any(p.requires_grad for p in module.parameters()):
        return None  # frozen connector: DeepSpeed reduces nothing here, so no hook to time
    return (args[0].detach().requires_grad_(True), *args[1:])


def _features_as_one_tensor(module: nn.Module, args: tuple, output):
    return (torch.cat(output, dim=0),) if isinstance(output, list) else None
