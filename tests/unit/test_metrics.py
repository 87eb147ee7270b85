"""FLOP model, peak table, throughput meter and the per-step counts."""
import pytest
import torch

from raytune_minicpmv.metrics import FlopModel, StepCounts, ThroughputMeter, format_log_line, peak_flops


def batch():
    return {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "labels": torch.tensor([[-100, 1, 2, -100, -100], [-100, -100, 3, 4, 5]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
        "tgt_sizes": [torch.tensor([[2, 3]]), torch.zeros(0, 2, dtype=torch.int32)],
    }


def test_step_counts_of_batch():
    c = StepCounts.of_batch(batch())
    assert (c.label_tokens, c.real_tokens, c.padded_tokens, c.samples) == (5, 8, 10, 2)
    assert (c.crops, c.images, c.patches, c.sum_len_sq, c.sum_patches_sq) == (1, 1, 6, 9 + 25, 36)
    both = StepCounts.from_tensor((c + c).as_tensor())
    assert both.label_tokens == 10 and both.patches == 12


def test_flop_formula_frozen_vision_lora_llm():
    fm = FlopModel({"llm": 100, "vpm": 10, "resampler": 5}, {"llm": 4, "vpm": 0, "resampler": 5},
                   llm_layers=2, llm_hidden=3, vision_layers=1, vision_hidden=2)
    c = StepCounts(real_tokens=8, patches=6, sum_len_sq=34, sum_patches_sq=36)
    f_llm = 2 * 100 * 8 + 2 * 2 * 3 * 34
    f_vpm = 2 * 10 * 6 + 4 * 1 * 2 * 36
    f_res = 2 * 5 * 6
    # forward everywhere; backward through LLM (activations + LoRA weights) and resampler, none through vision
    want = f_llm + f_vpm + f_res + (f_llm + 2 * 4 * 8) + (f_res + 2 * 5 * 6)
    assert fm.step_flops(c) == want


def test_flop_model_from_peft_model_counts_trainable_parts():
    from peft import LoraConfig, get_peft_model

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.llm = torch.nn.ModuleDict({"embed_tokens": torch.nn.Embedding(10, 4), "q_proj": torch.nn.Linear(4, 4,
                                                                                                             bias=False)})
            self.resampler = torch.nn.Linear(4, 4, bias=False)
            self.vpm = torch.nn.Linear(4, 4, bias=False)

    m = get_peft_model(M(), LoraConfig(r=2, target_modules=r"llm\.q_proj", modules_to_save=["resampler"]))
    fm = FlopModel.from_model(m)
    assert fm.n_params == {"llm": 16 + 2 * 4 * 2, "vpm": 16, "resampler": 16}  # embeddings are lookups, not FLOPs
    assert fm.n_trainable == {"llm": 16, "vpm": 0, "resampler": 16}


def test_peak_table_and_cpu():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Some Unknown Card") == 0.0
    if not torch.cuda.is_available():
        assert peak_flops() == 0.0


def test_meter_rates_and_mfu():
    fm = FlopModel({"llm": 1e9, "vpm": 0, "resampler": 0}, {"llm": 1e9, "vpm": 0, "resampler": 0})
    meter = ThroughputMeter(fm, peak=1e12, world_size=2)
    c = StepCounts(label_tokens=500, real_tokens=1000, padded_tokens=1250, samples=4, images=2)
    meter.add_step(c, step_s=2.0, data_wait_s=0.5)
    meter.add_step(c, step_s=2.0, data_wait_s=0.0)
    snap = meter.snapshot()
    assert snap["tokens_per_s"] == pytest.approx(500) and snap["padded_tokens_per_s"] == pytest.approx(625)
    assert snap["samples_per_s"] == pytest.approx(2) and snap["images_per_s"] == pytest.approx(1)
    assert snap["data_wait_frac"] == pytest.approx(0.125) and snap["step_time_s"] == pytest.approx(2.0)
    # 6 N per token (forward 2N, activation grads 2N, weight grads 2N) * 2000 tokens / 4 s / (2 GPUs * 1e12)
    assert snap["mfu"] == pytest.approx(6e9 * 2000 / 4 / 2e12)
    assert meter.snapshot()["tokens_per_s"] == 0  # the window reset
    assert meter.total.real_tokens == 2000
    line = format_log_line({"step": 3, "loss": 1.5, "lr": 1e-4, "grad_norm": 0.5, **snap})
    assert "step 3" in line and "loss 1.5000" in line
