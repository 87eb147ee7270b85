"""train.max_tokens_per_batch and data.packing: config validation (every conflict at once), the family rule
(models.packing.packing_refusal), the engine plan's micro-batch for a budget, and the step counts of a packed
row (samples and their lengths, not the row)."""
import json

import pytest
import torch

from raytune_minicpmv.config import ConfigError, load_config
from raytune_minicpmv.models import FAMILIES, ModelFamily
from raytune_minicpmv.models.packing import packing_refusal
from raytune_minicpmv.train.engine_plan import MicroBatch, micro_batch_shape
from raytune_minicpmv.train.metrics import StepCounts

from test_engine_plan import BENCH


def problems(*overrides) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(None, list(overrides), check_paths=False)
    return e.value.problems


def test_budget_and_packing_conflicts_are_listed_together():
    got = problems("data.model_max_length=2048", "train.max_tokens_per_batch=1024", "train.micro_batch_size=4",
                   "model.packed_attention=varlen", "scaling.use_gpu=false")
    assert len(got) == 3
    assert any(p.startswith("train.max_tokens_per_batch: 1024 is below data.model_max_length (2048)") for p in got)
    assert any(p.startswith("train.micro_batch_size: 4 together with train.max_tokens_per_batch") for p in got)
    assert any(p.startswith("model.packed_attention: varlen runs on GPUs only") for p in got)
    assert problems("data.packing=true") == [
        "data.packing: needs train.max_tokens_per_batch (the length of a packed row), e.g. 8192"]


def test_a_budget_at_the_longest_sample_and_packing_load():
    cfg = load_config(None, ["data.model_max_length=2048", "train.max_tokens_per_batch=2048", "data.packing=true",
                             "model.packed_attention=flex"], check_paths=False)
    assert (cfg.train.max_tokens_per_batch, cfg.data.packing, cfg.model.packed_attention) == (2048, True, "flex")


def test_auto_packed_attention_is_sdpa_off_cuda_and_fp32():
    from raytune_minicpmv.models.packing import resolve_packed_attention

    assert resolve_packed_attention("auto", on_gpu=False, dtype=torch.bfloat16) == "sdpa"
    assert resolve_packed_attention("auto", on_gpu=True, dtype=torch.float32) == "sdpa"
    assert resolve_packed_attention("flex", on_gpu=True, dtype=torch.float32) == "flex"
    assert problems("model.packed_attention=varlen", "model.dtype=fp32") == [
        "model.packed_attention: varlen runs in bf16/fp16 only; use sdpa or auto with model.dtype=fp32"]


def test_one_function_decides_which_families_pack(monkeypatch):
    assert packing_refusal("minicpmv2_6") is None and packing_refusal("minicpmv2_5") is None
    assert "remote code" in packing_refusal("minicpmv2_0")
    hybrid = ModelFamily("hybrid_test", "9.9", "qwen2", no_packing="linear-attention state crosses samples")
    monkeypatch.setitem(FAMILIES, "hybrid_test", hybrid)
    assert packing_refusal("hybrid_test") == "linear-attention state crosses samples"
    got = problems("model.family=hybrid_test", "data.packing=true", "train.max_tokens_per_batch=4096")
    assert got == ["data.packing: model family hybrid_test cannot train on packed rows (linear-attention state "
                   "crosses samples); set data.packing=false"]


def test_engine_plan_sizes_a_budget_micro_batch_from_the_data_rate(tmp_path):
    rows = tmp_path / "rows"
    rows.mkdir()
    report = {"splits": {"train": {"tokens": {"max": 950, "total": 66_000}, "crops_per_image": {"3": 20, "10": 80},
                                   "images": 100, "records_out": 100}}}
    (rows / "report.json").write_text(json.dumps(report))
    cfg = load_config(None, [f"data.output_path={rows}", "data.preprocessed=true", "train.max_tokens_per_batch=8192",
                             "data.packing=true"], check_paths=False)
    # 860 crops over 66,000 tokens: 8192 tokens hold ~107 crops; +25 % margin -> 134
    assert micro_batch_shape(cfg, BENCH) == MicroBatch(llm_tokens=8192, crops=134)
    raw = load_config(None, ["data.model_max_length=1024", "data.max_slice_nums=4",
                             "train.max_tokens_per_batch=4096"], check_paths=False)
    assert micro_batch_shape(raw, BENCH) == MicroBatch(llm_tokens=4096, crops=4 * 5)


def test_step_counts_of_a_packed_row_count_its_samples():
    lens = torch.tensor([5, 3, 4])
    batch = {"attention_mask": torch.ones(1, 12, dtype=torch.long), "labels": torch.tensor([[1] * 6 + [-100] * 6]),
             "seq_lens": lens, "tgt_sizes": [torch.tensor([[2, 3]])], "num_images": torch.tensor([1])}
    c = StepCounts.of_batch(batch)
    assert (c.samples, c.real_tokens, c.padded_tokens, c.label_tokens) == (3, 12, 12, 6)
    assert c.sum_len_sq == 25 + 9 + 16  # causal attention FLOPs per sample, not over the whole row
