"""A training forward and backward on the GPU: no host synchronisation from this package's code.

Each sync (a device-to-host read, a blocking host-to-device copy, `torch.tensor(..., device="cuda")`, an op whose
output size depends on device data) drains the GPU's queue. The batch is moved the way the train loop moves it
(pinned in the collate thread, `worker.to_device` with the model's host keys); the step runs once to warm up, then
once under torch's sync debug mode, which reports every synchronising call by its Python caller. The libraries'
own syncs are printed, not failed: transformers' causal-mask builder (one per forward, 5.17) and its SDPA mask
check on padded crops, Liger's fused CE. The CPU counterparts are tests/unit/train/test_host_reads.py.

Run on a CUDA machine: pytest -m gpu tests/gpu/test_host_syncs_gpu.py -s   (~30 s)
"""
from __future__ import annotations

import warnings

import pytest
import torch

from tests.unit.train.test_host_reads import batch  # the CPU test's batch: 3 crops, 25 labels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def syncs_of_a_step(model, b: dict) -> list[str]:
    from raytune_minicpmv.models.loss import batch_loss

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            total, _ = batch_loss(model, b, fused=True)
            total.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return [f"{w.filename}:{w.lineno}" for w in seen if "synchroniz" in str(w.message)]


@pytest.mark.parametrize("liger", [False, True], ids=["torch_kernels", "liger"])
@pytest.mark.parametrize("varlen", [True, False], ids=["packed_crops", "padded_crops"])
def test_a_training_step_on_the_gpu_has_no_host_sync(tmp_path, varlen, liger):
    if liger:
        pytest.importorskip("liger_kernel")
    from raytune_minicpmv.config.schema import LoraConfig, TrainableConfig
    from raytune_minicpmv.models import apply_trainable_policy, build_tiny, load_model
    from raytune_minicpmv.models.kernels import configure_kernels
    from raytune_minicpmv.models.loss import with_label_positions
    from raytune_minicpmv.train.worker import host_batch_keys, pinned, to_device

    ckpt = build_tiny("minicpmv2_6", tmp_path / "m", llm_hidden=256, llm_layers=2, query_num=16)
    model = load_model(ckpt, dtype=torch.bfloat16).cuda().train()
    configure_kernels(model, type("M", (), {"vision_varlen": varlen, "fused_ce": True, "liger": liger})(),
                      use_gpu=True)
    model = apply_trainable_policy(model, TrainableConfig(vision="full", llm="lora", resampler="full"),
                                   LoraConfig(r=4)).cuda()
    keep = host_batch_keys(model)
    moved = lambda: to_device(pinned(with_label_positions(batch())), torch.device("cuda"), keep)  # noqa: E731
    syncs_of_a_step(model, moved())  # warm-up: first-call work (kernel selection, Triton compiles)
    syncs = syncs_of_a_step(model, moved())
    print("library syncs:", [s for s in syncs if "/raytune_minicpmv/" not in s])
    assert [s for s in syncs if "/raytune_minicpmv/" in s] == []
