"""The train stage's per-family parts for MiniCPM-V 4.6 / 4.7: engine-choice sizes, throughput counts, FLOP parts.

Run: pytest tests/unit/train/test_v4_train_parts.py   (seconds; the tiny checkpoints of tests/conftest.py)
"""
from __future__ import annotations

import torch

from raytune_minicpmv.config import config_from_dict
from raytune_minicpmv.models import apply_trainable_policy, load_model, trainable_parameter_counts
from raytune_minicpmv.train.engine_plan import model_size
from raytune_minicpmv.train.metrics import FlopModel, StepCounts


def _cfg(ckpt, **trainable):
    return config_from_dict({"model": {"family": "minicpmv4_6", "path": str(ckpt)}, "trainable": trainable,
                             "lora": {"r": 4, "alpha": 8}}, check_paths=False)


def test_model_size_of_a_v4_checkpoint_counts_what_the_policy_trains(tiny46):
    """engine_plan's `auto` choices read 4.x sizes from the nested text/vision configs (it crashed on
    `from_checkpoint_dict` before) and count the policy's LoRA + connector copies like the loaded model."""
    c = _cfg(tiny46, vision="full")
    size = model_size(c)
    real = apply_trainable_policy(load_model(tiny46, dtype=torch.float32), c.trainable, c.lora)
    assert size.trainable == trainable_parameter_counts(real)["total"] > 0
    assert size.total == trainable_parameter_counts(real, trainable_only=False)["total"]
    text = real.config.text_config
    assert (size.llm_layers, size.llm_hidden, size.vocab) == (4, 64, text.vocab_size)
    assert (size.vision_layers, size.patches_per_crop) == (3, (448 // 14) ** 2)


def test_step_counts_of_a_processor_batch():
    """A 4.x batch: one `target_sizes` tensor for all crops of the batch, `num_images` from the collate (or none)."""
    ids = torch.ones(2, 10, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, -100),
             "target_sizes": torch.tensor([[8, 8], [4, 12], [8, 8]], dtype=torch.int32),
             "num_images": torch.tensor([1, 1])}
    batch["labels"][:, -3:] = 5
    c = StepCounts.of_batch(batch)
    assert (c.crops, c.patches, c.images, c.label_tokens, c.samples) == (3, 64 + 48 + 64, 2, 6, 2)
    del batch["num_images"], batch["target_sizes"]  # text only, straight from the processor
    c = StepCounts.of_batch(batch)
    assert (c.crops, c.patches, c.images) == (0, 0, 0)


def test_flop_model_finds_the_v4_parts(tiny46):
    model = apply_trainable_policy(load_model(tiny46, dtype=torch.float32), _cfg(tiny46).trainable, _cfg(tiny46).lora)
    fm = FlopModel.from_model(model)
    assert fm.n_params["llm"] > 0 and fm.n_params["vpm"] > 0 and fm.n_params["resampler"] > 0
    assert fm.n_trainable["resampler"] > 0 and fm.n_trainable["vpm"] == 0
    assert (fm.llm_layers, fm.llm_hidden, fm.vision_layers, fm.vision_hidden) == (4, 64, 3, 32)
