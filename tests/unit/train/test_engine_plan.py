"""engine_plan: `deepspeed.zero_stage: auto` / `model.gradient_checkpointing: auto` choices from the memory estimate,
and the per-tower gradient checkpointing they can choose."""
import json

import pytest
import torch

from raytune_minicpmv.config import load_config
from raytune_minicpmv.train.engine_plan import (GIB, MicroBatch, ModelSize, choose, estimate_bytes, micro_batch_shape,
                                          model_size, plan_engine)

# The issue-12 workload: 2.21 B MiniCPM-V-2.6-shaped (SigLIP-400M + Qwen2-1.5B dims), LoRA q/k/v + vision + resampler
BENCH = ModelSize(total=2_650_000_000, trainable=440_000_000, llm_hidden=1536, llm_layers=28,
                  llm_intermediate=8960, vocab=151_666, vision_hidden=1152, vision_layers=27,
                  vision_intermediate=4304, patches_per_crop=1024)
# MiniCPM-V 2.6 (8.1 B) fully fine-tuned
FULL_8B = ModelSize(total=8_100_000_000, trainable=8_100_000_000, llm_hidden=3584, llm_layers=28,
                    llm_intermediate=18944, vocab=151_666, vision_hidden=1152, vision_layers=27,
                    vision_intermediate=4304, patches_per_crop=1024)
H200, A100_80, L4_24 = int(139.8 * GIB), 80 * GIB, 24 * GIB


def cfg(*overrides):
    return load_config(None, ["model.dtype=bf16", *overrides], check_paths=False)


def test_a_model_that_fits_gets_zero0_without_recompute_never_zero3():
    plan = choose(cfg(), BENCH, MicroBatch(llm_tokens=2 * 950, crops=2 * 10), world=1, capacity_bytes=H200)
    assert (plan.stage, plan.ckpt, plan.fits) == (0, False, True)
    assert len(plan.tried) == 1  # the first candidate fitted
    assert "engine choice: ZeRO-0, gradient_checkpointing=false" in plan.describe()


def test_image_heavy_batch_checkpoints_the_vision_tower_first():
    mb = MicroBatch(llm_tokens=8 * 950, crops=8 * 10)  # 80 crops: the vision tower's activations dominate
    plan = choose(cfg(), BENCH, mb, world=1, capacity_bytes=A100_80)
    assert (plan.stage, plan.ckpt) == (0, "vision")
    # it tried no recompute on every non-ZeRO-3 stage first, and each was too large
    assert [(c.stage, c.ckpt, c.fits) for c in plan.tried[:3]] == [(0, False, False), (1, False, False),
                                                                   (2, False, False)]


def test_text_heavy_batch_checkpoints_the_llm_first():
    mb = MicroBatch(llm_tokens=4 * 4096, crops=4)  # long text, few images
    plan = choose(cfg("model.fused_ce=false"), BENCH, mb, world=1, capacity_bytes=A100_80)
    assert (plan.stage, plan.ckpt) == (0, "llm")


def test_fused_ce_counts_one_loss_chunk_instead_of_the_whole_logits():
    """model.fused_ce (auto: on) drops the [tokens, vocab] logits from the estimate: the issue-12 micro-batch of 8
    then fits the H200 without recompute (the logits path needs vision checkpointing there)."""
    from raytune_minicpmv.models.loss import CHUNK_ELEMENTS

    mb = MicroBatch(llm_tokens=8 * 942, crops=8 * 10)
    plain = estimate_bytes(cfg("model.fused_ce=false"), BENCH, mb, 1, 0, False)
    for fused in ("true", "auto"):
        got = estimate_bytes(cfg(f"model.fused_ce={fused}"), BENCH, mb, 1, 0, False)
        assert plain - got == 8 * 151_666 * mb.llm_tokens - 12 * CHUNK_ELEMENTS
    assert choose(cfg(), BENCH, mb, world=1, capacity_bytes=H200).ckpt is False
    assert choose(cfg("model.fused_ce=false"), BENCH, mb, world=1, capacity_bytes=H200).ckpt == "vision"


def test_full_finetune_of_8b_on_8_cards_partitions_only_as_far_as_needed():
    mb = MicroBatch(llm_tokens=2048, crops=10)
    on_80 = choose(cfg(), FULL_8B, mb, world=8, capacity_bytes=A100_80)
    # stage 0 holds 16 B × 8.1 B of optimizer state per card, stage 1 still every gradient: ZeRO-2 is the lowest
    assert (on_80.stage, on_80.ckpt) == (2, False)
    assert [(c.stage, c.fits) for c in on_80.tried] == [(0, False), (1, False), (2, True)]
    on_24 = choose(cfg(), FULL_8B, mb, world=8, capacity_bytes=L4_24)
    assert on_24.stage == 3  # bf16 weights alone (16 GB) leave no room without partitioning them


def test_nothing_fits_falls_back_to_zero3_full_recompute_and_says_what_to_do():
    plan = choose(cfg(), FULL_8B, MicroBatch(llm_tokens=2048, crops=10), world=1, capacity_bytes=L4_24)
    assert (plan.stage, plan.ckpt, plan.fits) == (3, True, False)
    assert "offload_optimizer=cpu" in plan.describe()


def test_explicit_choices_are_kept_and_only_auto_ones_chosen():
    mb = MicroBatch(llm_tokens=8 * 950, crops=80)
    plan = choose(cfg("deepspeed.zero_stage=2"), BENCH, mb, world=1, capacity_bytes=A100_80)
    assert plan.stage == 2 and plan.ckpt == "vision"
    plan = choose(cfg("model.gradient_checkpointing=true"), BENCH, mb, world=1, capacity_bytes=A100_80)
    assert (plan.stage, plan.ckpt) == (0, True)
    both = plan_engine(cfg("deepspeed.zero_stage=3", "model.gradient_checkpointing=false"), 1, H200)
    assert (both.stage, both.ckpt) == (3, False) and both.apply(cfg()).deepspeed.zero_stage == 3


def test_offload_restricts_the_stages():
    mb = MicroBatch(llm_tokens=2048, crops=10)
    assert choose(cfg("deepspeed.offload_optimizer=cpu"), BENCH, mb, 1, H200).stage == 2
    assert choose(cfg("deepspeed.offload_param=cpu"), BENCH, mb, 1, H200).stage == 3


def test_estimate_terms_partition_with_the_stage():
    mb = MicroBatch(llm_tokens=0, crops=0)
    c = cfg("deepspeed.overlap_comm=false")
    est = {s: estimate_bytes(c, FULL_8B, mb, 8, s, False) for s in range(4)}
    t, p, bucket = FULL_8B.trainable, FULL_8B.total, 2 * 5e8
    assert est[0] - est[1] == pytest.approx(16 * t * 7 / 8, rel=1e-6)  # optimizer state partitioned
    assert est[1] - est[2] == pytest.approx(2 * t * 7 / 8 - bucket, rel=1e-6)  # gradients partitioned
    assert est[2] - est[3] == pytest.approx(2 * p * 7 / 8 - 0.9 * bucket, rel=1e-6)  # weights partitioned


def test_model_size_counts_what_the_policy_will_train(tmp_path):
    """Meta-device counts equal the counts of the real loaded model under the same policy (LoRA + PEFT copies)."""
    from raytune_minicpmv.models import apply_trainable_policy, build_tiny, load_model, trainable_parameter_counts

    ckpt = build_tiny("minicpmv2_6", tmp_path / "m")
    c = cfg(f"model.path={ckpt}", "trainable.vision=full", "trainable.llm=lora")
    size = model_size(c)
    real = apply_trainable_policy(load_model(ckpt, dtype=torch.float32), c.trainable, c.lora)
    assert size.trainable == trainable_parameter_counts(real)["total"] > 0
    assert size.total == trainable_parameter_counts(real, trainable_only=False)["total"]
    assert (size.vision_layers, size.patches_per_crop, size.vocab) == (2, 1024, real.config.vocab_size)


def test_micro_batch_shape_uses_the_preprocess_report(tmp_path):
    rows = tmp_path / "rows"
    rows.mkdir()
    report = {"splits": {"train": {"tokens": {"max": 950}, "crops_per_image": {"3": 10, "10": 4},
                                   "images": 14, "records_out": 14}}}
    (rows / "report.json").write_text(json.dumps(report))
    c = cfg(f"data.output_path={rows}", "data.preprocessed=true", "train.micro_batch_size=4")
    assert micro_batch_shape(c, BENCH) == MicroBatch(llm_tokens=4 * 950, crops=4 * 10)
    raw = cfg("data.model_max_length=1024", "data.max_slice_nums=4", "train.micro_batch_size=2")
    assert micro_batch_shape(raw, BENCH) == MicroBatch(llm_tokens=2048, crops=10)


@pytest.mark.parametrize("mode", ["vision", "llm"])
def test_per_tower_checkpointing_flags_one_tower_and_keeps_gradients(tmp_path, mode):
    from raytune_minicpmv.models import build_tiny, compute_loss, enable_gradient_checkpointing, load_model
    from raytune_minicpmv.data.pipeline import preprocess_for_check
    from raytune_minicpmv.data.sample_data import write_sample_dataset

    ckpt = build_tiny("minicpmv2_6", tmp_path / "m")
    batch = preprocess_for_check(ckpt, write_sample_dataset(tmp_path / "d"), index=0)
    grads = {}
    for m in (False, mode):
        model = load_model(ckpt, dtype=torch.float32)
        model.train()
        enable_gradient_checkpointing(model, mode=m)
        flagged = {n.split(".")[0] for n, mod in model.named_modules() if getattr(mod, "gradient_checkpointing", 0)}
        loss, _ = compute_loss(model(batch).logits, batch["labels"])
        loss.backward()
        grads[m] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if m:
            assert flagged == {"vpm" if mode == "vision" else "llm"}
    assert grads[False].keys() == grads[mode].keys()
    for n in grads[False]:
        torch.testing.assert_close(grads[mode][n], grads[False][n], rtol=1e-5, atol=1e-6)


def test_union_length_counts_overlapping_kernels_once():
    from raytune_minicpmv.train.profiling import union_length

    assert union_length([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert union_length([]) == 0


def test_train_profile_flag_parses():
    from raytune_minicpmv.cli import build_parser

    assert build_parser().parse_args(["train", "--config", "c.yaml", "--profile", "a.b=1"]).profile is True
    assert build_parser().parse_args(["train", "--config", "c.yaml"]).profile is False
