"""QLoRA on a real GPU (opt-in: run on the GPU machine only; it needs bitsandbytes with the card's CUDA library,
e.g. the ~4 MB copy benchmarks/strip_bnb_wheel.py makes).

    python -m pytest -m gpu tests/gpu/test_qlora_gpu.py -q

1. NF4 at load on the GPU: the LLM linears are quantized ON the card (device_map to this rank's device), the rest
   stays bf16 there, and a bf16 forward matches the bf16 model up to the 4-bit rounding.
2. A short `run_train` of the tiny model with NF4 + LoRA, one worker per visible GPU, NCCL, bf16, ZeRO-2.
"""
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
bnb = pytest.importorskip("bitsandbytes")
DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
def test_nf4_is_quantized_on_the_card_and_runs_bf16(tmp_path):
    from raytune_minicpmv.models import build_tiny, load_model
    from raytune_minicpmv.models.quantization import quantized_module_names

    ckpt = build_tiny("minicpmv2_6", tmp_path / "model", llm_hidden=256, llm_intermediate=512)
    device = torch.device("cuda", 0)
    model = load_model(ckpt, dtype=torch.bfloat16, quantization="nf4", device=device)
    assert quantized_module_names(model) and all(n.startswith("llm.model.layers.") for n in quantized_module_names(model))
    assert {p.device for p in model.parameters()} == {device}
    q_proj = model.llm.model.layers[0].self_attn.q_proj
    assert q_proj.weight.dtype == torch.uint8 and q_proj.weight.quant_state.absmax.device.type == "cuda"
    plain = load_model(ckpt, dtype=torch.bfloat16).to(device)
    ids = torch.randint(0, 1000, (2, 48), device=device)
    batch = {"input_ids": ids, "position_ids": torch.arange(48, device=device).repeat(2, 1)}
    with torch.no_grad():
        ref, got = plain(batch).logits.float(), model(batch).logits.float()
    assert 0 < ((got - ref).abs().max() / ref.abs().max()).item() < 0.25


@needs_gpu
def test_run_train_qlora_nf4_zero2_bf16_on_gpus(tmp_path):
    import ray

    from raytune_minicpmv.config import load_config
    from raytune_minicpmv.data.sample_data import write_sample_dataset
    from raytune_minicpmv.models import build_tiny
    from raytune_minicpmv.train.trainer import run_train

    n_gpus = torch.cuda.device_count()
    cfg = load_config(DEMO, [
        f"model.path={build_tiny('minicpmv2_6', tmp_path / 'model')}",
        f"data.train_path={write_sample_dataset(tmp_path / 'data', 'train')}",
        f"data.eval_path={write_sample_dataset(tmp_path / 'data', 'eval')}",
        f"run.storage_path={tmp_path / 'runs'}", "run.name=qlora_gpu", "ray.num_cpus=null",
        "scaling.use_gpu=true", f"scaling.num_workers={n_gpus}", "scaling.cpus_per_worker=2", "model.dtype=bf16",
        "model.quantization=nf4", "deepspeed.zero_stage=2", "train.max_steps=6", "train.logging_steps=2",
        "train.eval_steps=6", "train.save_steps=6"])
    ray.init(address="local", include_dashboard=False)
    try:
        s = run_train(cfg)
    finally:
        ray.shutdown()
    assert s["steps"] == 6 and s["error"] is None
    assert s["peak_gpu_mem_gib"] > 0
    adapter = Path(s["checkpoint"]) / "adapter" / "adapter_model.safetensors"
    assert adapter.stat().st_size > 1000
