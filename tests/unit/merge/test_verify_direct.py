"""`verify_merged` called directly on a tiny Qwen2, its adapter and merges of it (no Ray): what it compares with
what, what it reports, and the text of a failure (found by mutation testing, docs/TESTING.md "Adapter reading and
merge verification"). The reference is computed here with PEFT itself.

    .venv/bin/python -m pytest tests/unit/merge/test_verify_direct.py -q
"""
from __future__ import annotations

import re
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from test_merge_lora import tiny_qwen2, train_adapter
from transformers import AutoModelForCausalLM

from raytune_minicpmv.config import MergeConfig
from raytune_minicpmv.merge.adapter import OLD_SIDE_FILE
from raytune_minicpmv.merge.merger import merge_adapter
from raytune_minicpmv.merge.verify import MergeVerificationError, tolerance, verify_merged

NORM = torch.full((32,), 3.0)  # the old side file's trained norm
NO_VERIFY = MergeConfig(dtype="fp32", verify_samples=0)


def _ids(n):
    """The token ids verify_merged runs on a checkpoint without a tokenizer: fixed seed 0, 24 tokens each."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (1, 24), generator=g) for _ in range(n)]


@torch.no_grad()
def _peft_logits(base, adapter, disabled=False):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.model.norm.weight.copy_(NORM)  # the side file, loaded into the base before PEFT
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    if disabled:
        with model.disable_adapter():
            return [model(input_ids=x).logits for x in _ids(2)]
    return [model(input_ids=x).logits for x in _ids(2)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify_direct")
    base = tiny_qwen2(root / "base")
    adapter = train_adapter(base, root / "adapter", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                            modules_to_save=["embed_tokens"])
    torch.save({"model.norm.weight": NORM}, adapter / OLD_SIDE_FILE)
    merged = merge_adapter(base, adapter, root / "merged", NO_VERIFY)
    return base, adapter, merged, root


def test_a_correct_merge_reports_what_it_measured(world):
    base, adapter, merged, _ = world
    cfg = MergeConfig(dtype="fp32", verify_samples=2)
    result = verify_merged(base, adapter, merged, cfg)
    reference, disabled = _peft_logits(base, adapter), _peft_logits(base, adapter, disabled=True)
    absmax = max(r.abs().max().item() for r in reference)
    effect = max((r - d).abs().max().item() for r, d in zip(reference, disabled))
    assert set(result) == {"samples", "max_abs_diff", "atol", "atol_source", "noise", "adapter_effect",
                           "logits_absmax", "dtype"}
    assert result["samples"] == 2 and result["dtype"] == "fp32" and result["atol_source"] == "measured"
    assert result["logits_absmax"] == pytest.approx(absmax, rel=1e-6)
    assert result["adapter_effect"] == pytest.approx(effect, rel=1e-4) and effect > 0.05
    assert 0 <= result["noise"] < 1e-5 and 0 <= result["max_abs_diff"] <= result["atol"]
    assert result["atol"] == tolerance(cfg, torch.float32, result["noise"], result["logits_absmax"])


def test_a_merge_without_the_side_file_fails_and_says_why(world):
    """The reference loads the old side file into the base: a merge that left it out differs."""
    base, adapter, _, root = world
    plain = root / "plain_adapter"
    if not plain.exists():
        shutil.copytree(adapter, plain, ignore=shutil.ignore_patterns(OLD_SIDE_FILE))
    wrong = merge_adapter(base, plain, root / "merged_without_side_file", NO_VERIFY)
    with pytest.raises(MergeVerificationError) as err:
        verify_merged(base, adapter, wrong, MergeConfig(dtype="fp32", verify_samples=2))
    text = str(err.value)
    assert text.startswith(f"merged model at {wrong} does not reproduce adapter-on-base: max |Δlogits| per sample [")
    diffs = re.search(r"per sample \[([^]]*)\]", text)[1].split(", ")
    assert len(diffs) == 2 and all(float(d.strip("'")) > 1e-3 for d in diffs)
    assert re.search(r"> the tolerance \S+ \(= max\(3\.0 x the rounding noise \S+, 2 fp32 steps at \|logit\| \S+\)\); "
                     r"the adapter itself moves the logits by up to \S+\. A wrong merge", text), text


def test_a_fixed_atol_is_named_in_the_report_and_the_failure(world):
    base, adapter, merged, _ = world
    result = verify_merged(base, adapter, merged, MergeConfig(dtype="fp32", verify_samples=1, verify_atol=1.0))
    assert result["samples"] == 1 and result["atol"] == 1.0 and result["atol_source"] == "merge.verify_atol"
    with pytest.raises(MergeVerificationError, match=r"\['[^']+'\] > merge\.verify_atol=-1; the adapter itself"):
        verify_merged(base, adapter, merged, MergeConfig(dtype="fp32", verify_samples=1, verify_atol=-1.0))


def test_a_full_model_dir_is_loaded_into_the_base_as_the_reference(world, tmp_path):
    """No adapter_config.json: the trained tensors are copied into the base; no PEFT, so no noise or effect."""
    base, _, _, _ = world
    full = tmp_path / "full_model"
    full.mkdir()
    save_file({"model.norm.weight": NORM, "lm_head.weight": torch.randn(256, 32)}, str(full / "model.safetensors"))
    merged = merge_adapter(base, full, tmp_path / "merged", NO_VERIFY)
    result = verify_merged(base, full, merged, MergeConfig(dtype="fp32", verify_samples=1))
    assert result["noise"] is None and result["adapter_effect"] is None and result["max_abs_diff"] == 0.0
    assert result["atol"] == tolerance(MergeConfig(), torch.float32, None, result["logits_absmax"])
    with pytest.raises(MergeVerificationError, match="the adapter itself moves the logits by up to None"):
        verify_merged(base, full, base, MergeConfig(dtype="fp32", verify_samples=1))  # the base is not the merge
