"""Model layer: native MiniCPM-V 2.x families (state-dict compatible with the official checkpoints).

    from raytune_minicpmv.models import get_family, load_model, build_tiny, apply_trainable_policy, compute_loss
    ckpt = build_tiny("minicpmv2_6", "/tmp/tiny")
    model = load_model(ckpt, dtype=torch.float32)
    loss_sum, n_tokens = compute_loss(model(batch).logits, batch["labels"])

See docs/MODELS.md (families, trust_remote_code, loss normalization, build_tiny arguments).
"""
from .configuration import MiniCPMV25Config, MiniCPMV26Config, MiniCPMVConfig
from .loss import IGNORE_INDEX, compute_loss
from .modeling import MiniCPMV25, MiniCPMV26, MiniCPMVBase
from .policy import (apply_trainable_policy, enable_gradient_checkpointing, format_parameter_table, part_of,
                     trainable_parameter_counts)
from .registry import FAMILIES, CheckpointError, ModelFamily, detect_family, get_family, load_model, load_model_for
from .tiny import build_tiny

__all__ = ["MiniCPMVConfig", "MiniCPMV26Config", "MiniCPMV25Config", "MiniCPMVBase", "MiniCPMV26", "MiniCPMV25",
           "FAMILIES", "ModelFamily", "CheckpointError", "get_family", "detect_family", "load_model",
           "load_model_for", "build_tiny",
           "apply_trainable_policy", "trainable_parameter_counts", "format_parameter_table", "part_of",
           "enable_gradient_checkpointing", "compute_loss", "IGNORE_INDEX"]
