"""FLOP model, peak table, throughput meter and the per-step counts."""
import pytest
import torch

from raytune_minicpmv.train.metrics import FlopModel, StepCounts, ThroughputMeter, format_log_line, peak_flops


def batch():
    return {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "labels": torch.tensor([[-100, 1, 2, -100, -100], [-100, -100, 3, 4, 5]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
        "tgt_sizes": [torch.tensor([[2, 3]]), torch.zeros(0, 2, dtype=torch.int32)],
        "num_images": torch.tensor([1, 0]),
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


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_meter_rates_and_mfu_over_wall_clock():
    fm = FlopModel({"llm": 1e9, "vpm": 0, "resampler": 0}, {"llm": 1e9, "vpm": 0, "resampler": 0})
    clock = FakeClock()
    meter = ThroughputMeter(fm, peak=1e12, world_size=2, clock=clock)
    c = StepCounts(label_tokens=500, real_tokens=1000, padded_tokens=1250, samples=4, images=2)
    meter.start()
    clock.t += 2.0
    meter.add_step(c, step_s=2.0, data_wait_s=0.5)
    clock.t += 2.0
    meter.add_step(c, step_s=2.0, data_wait_s=0.0)
    snap = meter.snapshot()
    assert snap["tokens_per_s"] == pytest.approx(500) and snap["padded_tokens_per_s"] == pytest.approx(625)
    assert snap["samples_per_s"] == pytest.approx(2) and snap["images_per_s"] == pytest.approx(1)
    assert snap["data_wait_frac"] == pytest.approx(0.125) and snap["step_time_s"] == pytest.approx(2.0)
    assert snap["overhead_frac"] == pytest.approx(0.0)
    # 6 N per token (forward 2N, activation grads 2N, weight grads 2N) * 2000 tokens / 4 s / (2 GPUs * 1e12)
    assert snap["mfu"] == pytest.approx(6e9 * 2000 / 4 / 2e12)
    assert meter.snapshot()["tokens_per_s"] == 0  # the window reset
    assert meter.total.real_tokens == 2000
    line = format_log_line({"step": 3, "loss": 1.5, "lr": 1e-4, "grad_norm": 0.5, **snap}, max_steps=10,
                           elapsed_s=75, eta_s=3725)
    assert line.startswith("step 3/10 | loss 1.5000") and line.endswith("0:01:15 elapsed, eta 1:02:05")


def test_meter_counts_the_time_between_steps():
    """The issue-9 stall: a 0.75 s step that comes every 2 s (ray.train.report waiting for the controller's poll)
    is a 2 s step for throughput, not a 0.75 s one; the time outside the step shows as overhead_frac."""
    fm = FlopModel({"llm": 1e9, "vpm": 0, "resampler": 0}, {"llm": 1e9, "vpm": 0, "resampler": 0})
    clock = FakeClock()
    meter = ThroughputMeter(fm, peak=1e12, world_size=1, clock=clock)
    c = StepCounts(real_tokens=1000, padded_tokens=1000, samples=2, images=2)
    meter.start()
    for _ in range(4):
        clock.t += 0.75  # inside train_step
        meter.add_step(c, step_s=0.75, data_wait_s=0.0)
        clock.t += 1.25  # outside: logging, reports, evaluation, checkpoints
    clock.t -= 1.25  # the window ends at the last step's end
    snap = meter.snapshot()
    assert snap["step_time_s"] == pytest.approx((3 * 2.0 + 0.75) / 4)
    assert snap["tokens_per_s"] == pytest.approx(4000 / 6.75)
    assert snap["mfu"] == pytest.approx(6e9 * 4000 / 6.75 / 1e12)
    assert snap["overhead_frac"] == pytest.approx(1 - 3.0 / 6.75)
    assert meter.run_means()["mean_tokens_per_s"] == pytest.approx(4000 / 6.75)
    assert meter.run_means()["train_time_s"] == pytest.approx(6.75)


def test_images_per_s_counts_images_not_crops():
    """Two rows: one image sliced into 3 crops, one image with 1 crop: 2 images, 4 crops."""
    from raytune_minicpmv.data.rows import collate_rows

    rows = {"input_ids": [[1, 2, 3], [4, 5]], "labels": [[-100, 2, 3], [-100, 5]],
            "pixel_values": [bytes(3 * 14 * 14 * 3), bytes(3 * 14 * 14)],
            "tgt_sizes": [[1, 1, 1, 1, 1, 1], [1, 1]], "image_bound": [[0, 1, 1, 2, 2, 3], [0, 1]],
            "num_images": [1, 1], "skip_reason": ["", ""]}
    c = StepCounts.of_batch(collate_rows(rows))
    assert (c.images, c.crops) == (2, 4)
    meter = ThroughputMeter(FlopModel({"llm": 0, "vpm": 0, "resampler": 0}, {"llm": 0, "vpm": 0, "resampler": 0}),
                            peak=0.0, world_size=1, clock=FakeClock())
    meter.clock.t += 1.0
    meter.add_step(c, step_s=1.0, data_wait_s=0.0)
    assert meter.snapshot()["images_per_s"] == pytest.approx(2.0)
