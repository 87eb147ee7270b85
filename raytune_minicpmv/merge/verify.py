"""Check a merged checkpoint against the adapter it came from: same logits on real samples, within a tolerance.

    from raytune_minicpmv.merge.verify import verify_merged
    verify_merged(base_dir, adapter_dir, merged_dir, merge_cfg)   # -> {"max_abs_diff": .., "atol": ..}, or raises

Reference: the base checkpoint loaded in the merge dtype with the adapter applied the way users apply it
(`peft.PeftModel.from_pretrained`, plus the old `vpm_resampler_embedtokens.pt` / a `full_model/` dir loaded into the
base). Candidate: the merged directory loaded from disk by the same loader. MiniCPM-V checkpoints load with the package's
`load_model` and run on a few records of the sample dataset (images + multi-turn text, sliced and tokenized by the
data stage with the merged directory's own tokenizer and preprocessor config); other causal LMs load with transformers
and run on tokenized text. One model is in memory at a time.

The tolerance. An absolute bound cannot fit every model: bf16 logits of a trained LLM reach the tens, where one bf16
step is 0.125, so a correct merge can differ from adapter-on-base by more than any fixed small number, while a
large bound hides wrong merges on small logits. Unless `merge.verify_atol` fixes it, the bound is measured on the
model itself: after the reference pass, PEFT folds the same adapter into the same in-memory model (`merge_adapter`,
in the same dtype) and runs the samples again. That is a second, mathematically equal computation of adapter-on-base,
so its distance to the reference is this model's own rounding noise for a correct merge (`noise`). The merged
checkpoint must stay within `merge.verify_noise_factor` × noise, and never below `_FLOOR_ULPS` steps of the dtype at
the largest logit (the rounding of the logits themselves; it is the whole bound where there is no LoRA to fold).
What it cannot see: a wrong delta whose effect on the logits is below that noise (a bf16 merge rounds every merged
weight, and bf16 forward passes round every activation); docs/MERGE.md has measured numbers.
"""
from __future__ import annotations

import gc
import logging
import math
import tempfile
from pathlib import Path

import torch

from ..config import MergeConfig
from .adapter import OLD_SIDE_FILE, read_adapter
from ..models.registry import as_torch_dtype

log = logging.getLogger(__name__)

_TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank.",
          "A merged checkpoint must reproduce the adapter model: 3 + 4 = 7, and red circles are round.",
          "Describe the image in one sentence, then list the colours you see."]
_FLOOR_ULPS = 2  # the bound never goes below this many dtype steps at the largest |logit|


class MergeVerificationError(RuntimeError):
    """The merged model's logits differ from the adapter-on-base model's by more than the tolerance."""


def verify_merged(base_dir, adapter_dir, merged_dir, merge_cfg: MergeConfig) -> dict:
    dtype = as_torch_dtype(merge_cfg.dtype)
    device = torch.device("cuda" if merge_cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu")
    native = _is_minicpmv(merged_dir)
    with tempfile.TemporaryDirectory(prefix="merge-verify-") as scratch:
        batches = _minicpmv_batches(merged_dir, merge_cfg.verify_samples, Path(scratch)) if native else \
            _text_batches(merged_dir, merge_cfg.verify_samples)
        model = _adapter_model(base_dir, adapter_dir, dtype, native)
        reference = _logits(model, batches, device, native)
        effect = noise = None
        if hasattr(model, "disable_adapter"):  # a PEFT model: how much the adapter matters, and the rounding noise
            with model.disable_adapter():
                effect = max_abs_diff(reference, _logits(model, batches, device, native))
            model.merge_adapter()  # PEFT's own fold of the same adapter, in place: a second, equal computation
            noise = max_abs_diff(reference, _logits(model, batches, device, native))
        del model
        gc.collect()  # never hold two models
        merged = _logits(_load(merged_dir, dtype, native), batches, device, native)
    diffs = [(r - m).abs().max().item() for r, m in zip(reference, merged)]
    absmax = max(r.abs().max().item() for r in reference)
    atol = tolerance(merge_cfg, dtype, noise, absmax)
    result = {"samples": len(diffs), "max_abs_diff": max(diffs), "atol": atol,
              "atol_source": "merge.verify_atol" if merge_cfg.verify_atol is not None else "measured",
              "noise": noise, "adapter_effect": effect, "logits_absmax": absmax, "dtype": merge_cfg.dtype}
    if not max(diffs) <= atol:  # `not <=` also catches NaN
        bound = (f"merge.verify_atol={atol:.3g}" if merge_cfg.verify_atol is not None else
                 f"the tolerance {atol:.3g} (= max({merge_cfg.verify_noise_factor} x the rounding noise {noise}, "
                 f"{_FLOOR_ULPS} {merge_cfg.dtype} steps at |logit| {absmax:.3g}))")
        raise MergeVerificationError(
            f"merged model at {merged_dir} does not reproduce adapter-on-base: max |Δlogits| per sample "
            f"{[f'{d:.3g}' for d in diffs]} > {bound}; the adapter itself moves the logits by up to {effect}. "
            "A wrong merge (key mapping, scaling, a missing delta) differs by a fraction of the adapter's effect; "
            "a correct one by about the noise of PEFT folding the same adapter in the same dtype.")
    log.info("merge verification passed: %s", result)
    return result


def tolerance(merge_cfg: MergeConfig, dtype: torch.dtype, noise: float | None, logits_absmax: float) -> float:
    """`merge.verify_atol` when set; else max(verify_noise_factor × noise, _FLOOR_ULPS dtype steps at the top logit)."""
    if merge_cfg.verify_atol is not None:
        return merge_cfg.verify_atol
    floor = _FLOOR_ULPS * dtype_step(dtype, logits_absmax)
    return max(floor, merge_cfg.verify_noise_factor * noise) if noise is not None else floor


def dtype_step(dtype: torch.dtype, magnitude: float) -> float:
    """The spacing of `dtype` numbers at `magnitude` (one unit in the last place; at least the spacing at 1.0)."""
    exponent = math.floor(math.log2(magnitude)) if magnitude >= 1.0 else 0
    return torch.finfo(dtype).eps * 2.0 ** exponent


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------------------------
# Models


def _is_minicpmv(path):
    """The MiniCPM-V family name of a checkpoint (truthy), or None for any other model."""
    from ..models.registry import detect_family, read_config_json

    return detect_family(read_config_json(path))


def _load(path, dtype: torch.dtype, native: bool) -> torch.nn.Module:
    if native:
        from ..models import load_model

        return load_model(path, dtype=dtype).eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def _adapter_model(base_dir, adapter_dir, dtype: torch.dtype, native: bool) -> torch.nn.Module:
    """The base with the adapter applied as users load it (not merged)."""
    model = _load(base_dir, dtype, native)
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "adapter_config.json").is_file():
        _load_extra_tensors(model, adapter_dir, side_file_only=True)
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    _load_extra_tensors(model, adapter_dir, side_file_only=False)  # a full_model/ dir of trained tensors
    return model


def _load_extra_tensors(model: torch.nn.Module, adapter_dir: Path, side_file_only: bool) -> None:
    """Trained tensors that are not PEFT modules (old side file, full_model/) copied into the base by key."""
    if side_file_only and not (adapter_dir / OLD_SIDE_FILE).is_file():
        return
    adapter = read_adapter(adapter_dir, set(model.state_dict().keys()))
    state = {key: adapter.tensors.get(store_key) for key, store_key in adapter.replacements.items()
             if not side_file_only or store_key.startswith("side:")}
    model.load_state_dict(state, strict=False)


@torch.no_grad()
def _logits(model: torch.nn.Module, batches: list, device: torch.device, native) -> list[torch.Tensor]:
    model.to(device)
    out = []
    for batch in batches:
        if native:  # the family name: 2.x take the batch dict, 4.x the processor's keywords (models/forward.py)
            from ..models.forward import forward_logits

            batch = _to_device(batch, device)
            out.append(forward_logits(model, batch, native).float().cpu())
        else:
            out.append(model(input_ids=batch.to(device)).logits.float().cpu())
    return out


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


# --------------------------------------------------------------------------------------------------------------
# Samples


def _text_batches(model_dir, n: int) -> list[torch.Tensor]:
    """Tokenized sentences (the checkpoint's tokenizer), or fixed-seed token ids when it ships none."""
    import json

    vocab = json.loads((Path(model_dir) / "config.json").read_text()).get("vocab_size", 1000)
    if (Path(model_dir) / "tokenizer_config.json").is_file():
        from ..models.tokenizer_loading import load_tokenizer

        tok = load_tokenizer(model_dir)
        ids = [tok(_TEXTS[i % len(_TEXTS)])["input_ids"] for i in range(n)]
        if all(ids) and max(max(x) for x in ids) < vocab:
            return [torch.tensor([x]) for x in ids]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, 24), generator=g) for _ in range(n)]


def _minicpmv_batches(model_dir, n: int, scratch: Path) -> list[dict]:
    """One collated batch per record of the sample dataset (real images, slicing, chat template)."""
    from ..data.pipeline import preprocess_for_check
    from ..data.sample_data import write_sample_dataset

    records = write_sample_dataset(scratch / "data", split="eval", num_records=max(n, 6))
    return [preprocess_for_check(model_dir, records, index=i) for i in range(n)]
