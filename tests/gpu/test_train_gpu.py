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
