"""`model.vision_attention` and `model.sdpa_kernel` (models/kernels.py): how auto resolves, what is refused.

The varlen kernel itself runs on CUDA only: tests/gpu/test_kernels_gpu.py compares it with the grouped path.
Run: pytest tests/unit/models/test_vision_attention_plan.py   (~10 s)
"""
from __future__ import annotations

import types

import pytest
import torch

from raytune_minicpmv.config import ConfigError, load_config
from raytune_minicpmv.models.vision import CropRuns


def test_cu_seqlens_give_every_crop_start_and_the_total():
    runs = CropRuns.from_sizes(torch.tensor([[32, 32], [32, 32], [37, 28], [2, 3]]))
    assert runs.runs == ((0, 2, 1024), (2048, 1, 1036), (3084, 1, 6))
    assert runs.cu_seqlens() == [0, 1024, 2048, 3084, 3090]
    assert runs.longest == 1036


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from raytune_minicpmv.models import build_tiny, load_model

    return load_model(build_tiny("minicpmv2_6", tmp_path_factory.mktemp("m")), dtype=torch.bfloat16)


def switches(**kw):
    return types.SimpleNamespace(**{"vision_varlen": "auto", "fused_ce": "auto", "liger": False, **kw})


def test_on_cpu_auto_is_the_grouped_attention_and_torchs_own_sdpa_choice(tiny_model):
    from raytune_minicpmv.models.kernels import plan_kernels

    plan = plan_kernels(tiny_model, switches(vision_attention="auto", sdpa_kernel="auto"), use_gpu=False)
    assert (plan.vision_attention, plan.sdpa_kernel) == ("grouped", "default")
    assert "vision_varlen=on (grouped attention)" in plan.describe() and "sdpa=default" in plan.describe()


def test_varlen_where_it_cannot_run_is_refused_naming_the_needs(tiny_model):
    from raytune_minicpmv.models.kernels import plan_kernels

    with pytest.raises(ValueError, match="model.vision_attention=varlen: needs packed vision .* CUDA GPUs"):
        plan_kernels(tiny_model, switches(vision_attention="varlen"), use_gpu=False)


def test_without_packed_vision_the_attention_is_grouped(tiny_model):
    from raytune_minicpmv.models.kernels import configure_kernels

    model = tiny_model
    plan = configure_kernels(model, switches(vision_varlen=False, vision_attention="auto"), use_gpu=False)
    assert plan.vision_attention == "grouped" and "grouped attention" not in plan.describe()
    assert torch.backends.cuda.cudnn_sdp_enabled()  # CPU runs leave torch's SDPA settings alone


@pytest.mark.parametrize("overrides, needle", [
    (["model.vision_attention=varlen", "scaling.use_gpu=false", "model.dtype=fp32"],
     "model.vision_attention: varlen needs GPUs and model.dtype bf16 or fp16"),
    (["model.vision_attention=varlen", "scaling.use_gpu=true", "model.vision_varlen=false"],
     "model.vision_attention: varlen attends packed crops"),
    (["model.sdpa_kernel=fast"], "model.sdpa_kernel"),
])
def test_config_refuses_impossible_attention_settings(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, check_paths=False)
    assert needle in str(e.value)


def test_config_takes_the_attention_settings():
    cfg = load_config(None, ["model.vision_attention=varlen", "scaling.use_gpu=true", "model.sdpa_kernel=cudnn"],
                      check_paths=False)
    assert (cfg.model.vision_attention, cfg.model.sdpa_kernel) == ("varlen", "cudnn")
    assert load_config(None, [], check_paths=False).model.vision_attention == "auto"
