"""models/zero3.py: the 4.x connector prepared for ZeRO-3 (without starting DeepSpeed: the leaf flags and the two
hooks on a PEFT-wrapped tiny model). The 2-rank ZeRO-3 runs: tests/integration/test_v4_zero3_mixed.py."""
from __future__ import annotations

import pytest
import torch

from raytune_minicpmv.config import LoraConfig, TrainableConfig, config_from_dict
from raytune_minicpmv.models import apply_trainable_policy, load_model
from raytune_minicpmv.models.zero3 import prepare_for_zero3

LORA = LoraConfig(r=4, alpha=8, dropout=0.0)


@pytest.mark.parametrize("family", ["minicpmv4_6", "minicpmv4_7"])
def test_the_connector_is_a_zero3_leaf_returning_one_tensor(family, request):
    from deepspeed.utils import get_z3_leaf_modules

    ckpt = request.getfixturevalue("tiny46" if family == "minicpmv4_6" else "tiny47")
    model = apply_trainable_policy(load_model(ckpt, dtype=torch.float32), TrainableConfig(), LORA)
    vlm = model.get_base_model().model
    pixels, sizes = torch.randn(1, 3, 14, 14 * 48), torch.tensor([[4, 4], [4, 8]], dtype=torch.int32)
    with torch.no_grad():
        before = vlm.get_image_features(pixels, sizes).pooler_output
    leaves = prepare_for_zero3(model)
    # both PEFT copies of the connector are flagged; DeepSpeed stops at the wrapper around them (it forwards the flag)
    flagged = {type(m).__name__ for m in get_z3_leaf_modules(model)}
    assert flagged == {f"MiniCPMV{family[-3:].upper()}Merger", "ModulesToSaveWrapper"}
    assert leaves == [vlm.merger] and type(vlm.merger).__name__ == "ModulesToSaveWrapper"
    after = vlm.get_image_features(pixels, sizes).pooler_output
    assert isinstance(before, list) and len(before) == 2  # per crop
    assert isinstance(after, tuple) and len(after) == 1 and torch.equal(after[0].detach(), torch.cat(before))
    # the frozen tower's output needs no grad, the trained connector makes its input require it (backward hook timing)
    hidden = torch.randn(1, 32, vlm.merger.modules_to_save.default.mlp[0].pre_norm.normalized_shape[0] // 4)
    seen = []
    handle = vlm.merger.modules_to_save.default.mlp[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    vlm.merger(hidden, torch.tensor([[4, 8]], dtype=torch.int32))
    with torch.no_grad():
        vlm.merger(hidden, torch.tensor([[4, 8]], dtype=torch.int32))
    handle.remove()
    assert seen[0].requires_grad and not seen[1].requires_grad  # eval / no_grad: left alone


def test_frozen_connector_input_is_left_alone_and_2x_models_get_no_leaf(tiny46, published26):
    frozen = apply_trainable_policy(load_model(tiny46, dtype=torch.float32),
                                    TrainableConfig(resampler="frozen"), LORA)
    merger = frozen.get_base_model().model.merger
    assert prepare_for_zero3(frozen) == [merger]  # no PEFT copy: the connector itself
    seen = []
    merger.mlp[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    merger(torch.randn(1, 32, merger.mlp[0].pre_norm.normalized_shape[0] // 4), torch.tensor([[4, 8]]))
    assert not seen[0].requires_grad  # nothing to reduce there: no extra input gradient computed
    assert prepare_for_zero3(load_model(published26, dtype=torch.float32)) == []


def test_zero3_is_accepted_for_v4_and_auto_may_choose_it(tiny46):
    from raytune_minicpmv.train.engine_plan import MicroBatch, choose, model_size

    config_from_dict({"model": {"family": "minicpmv4_6"}, "deepspeed": {"zero_stage": 3}}, check_paths=False)
    config_from_dict({"model": {"family": "minicpmv4_7"}, "deepspeed": {"offload_param": "cpu"}}, check_paths=False)
    cfg = config_from_dict({"model": {"family": "minicpmv4_6", "path": str(tiny46)},
                            "deepspeed": {"zero_stage": "auto"}}, check_paths=False)
    plan = choose(cfg, model_size(cfg), MicroBatch(llm_tokens=512, crops=10), world=2, capacity_bytes=1)
    assert plan.stage == 3 and not plan.fits  # nothing fits 1 byte: the fallback is ZeRO-3, as for 2.6
