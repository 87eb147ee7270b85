"""Training on real GPUs (opt-in: run on the GPU machine only).

    python -m pytest -m gpu tests/gpu/test_train_gpu.py -q

A short `run_train` of the tiny model with one worker per visible GPU, NCCL, bf16, ZeRO-3 + LoRA: the whole stage
(Ray Data → TorchTrainer → DeepSpeed on CUDA → checkpoint with a PEFT adapter) on the real backend.
"""
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_run_train_on_gpus_zero3_lora_bf16(tmp_path):
    import ray

    from raytune_minicpmv.config import load_config
    from raytune_minicpmv.models import build_tiny
    from raytune_minicpmv.data.sample_data import write_sample_dataset
    from raytune_minicpmv.train.trainer import run_train

    n_gpus = torch.cuda.device_count()
    cfg = load_config(DEMO, [
        f"model.path={build_tiny('minicpmv2_6', tmp_path / 'model')}",
        f"data.train_path={write_sample_dataset(tmp_path / 'data', 'train')}",
        f"data.eval_path={write_sample_dataset(tmp_path / 'data', 'eval')}",
        f"run.storage_path={tmp_path / 'runs'}", "run.name=gpu", "ray.num_cpus=null",
        "scaling.use_gpu=true", f"scaling.num_workers={n_gpus}", "scaling.cpus_per_worker=2", "model.dtype=bf16",
        "train.max_steps=6", "train.logging_steps=2", "train.eval_steps=6", "train.save_steps=6"])
    ray.init(address="local", include_dashboard=False)
    try:
        s = run_train(cfg)
    finally:
        ray.shutdown()
    assert s["steps"] == 6 and s["error"] is None
    assert s["peak_gpu_mem_gib"] > 0 and s["mean_mfu"] > 0
    adapter = Path(s["checkpoint"]) / "adapter" / "adapter_model.safetensors"
    assert adapter.stat().st_size > 1000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_batches_come_pinned_so_their_copies_to_the_gpu_are_asynchronous():
    """epoch_batches pins the collate output in Ray Data's collate thread on CUDA (worker.pinned); to_device then
    queues the copies instead of staging them on the host."""
    import ray

    from raytune_minicpmv.config import load_config
    from raytune_minicpmv.train.worker import epoch_batches, to_device

    def collate(b):
        x = torch.as_tensor(b["x"])
        return {"x": x, "crops": [[x.float() * 2, x.float()]], "n": 3}

    cfg = load_config(DEMO, ["train.micro_batch_size=4"], check_paths=False)
    ray.init(address="local", include_dashboard=False)
    try:
        batches = list(epoch_batches(ray.data.range(8).map(lambda r: {"x": r["id"]}), cfg, collate, drop_last=True))
    finally:
        ray.shutdown()
    assert len(batches) == 2
    for b in batches:
        assert b["x"].is_pinned() and all(t.is_pinned() for t in b["crops"][0]) and b["n"] == 3
        on_gpu = to_device(b, torch.device("cuda"))
        torch.cuda.synchronize()
        assert on_gpu["crops"][0][0].is_cuda and torch.equal(on_gpu["crops"][0][0].cpu(), b["x"].float() * 2)
