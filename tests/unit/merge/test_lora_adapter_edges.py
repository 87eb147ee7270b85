"""lora_adapter pieces the end-to-end merge tests do not reach (found by mutation testing, docs/TESTING.md):
`merged_tensor` called on its own (shape checks, NaN guard, in-memory stores left untouched, non-float tensors kept),
and `TensorStore` lookups across several prefixed sources.

    .venv/bin/python -m pytest tests/unit/merge/test_lora_adapter_edges.py -q
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from raytune_minicpmv.merge.adapter import Adapter, LoraFactors, TensorStore, merged_tensor
from raytune_minicpmv.merge.safetensors_stream import SafetensorsFiles


def _adapter(memory: dict, **kw) -> Adapter:
    store = TensorStore()
    store.add_memory(memory, "")
    return Adapter(tensors=store, **kw)


def test_a_trained_copy_of_the_wrong_shape_is_refused_naming_both_shapes():
    adapter = _adapter({"copy": torch.ones(3, 2)}, replacements={"w": "copy"})
    with pytest.raises(ValueError, match=r"^w: trained copy has shape \(3, 2\), base has \(2, 3\)$"):
        merged_tensor("w", torch.zeros(2, 3), adapter, torch.float32)
    same = merged_tensor("w", torch.zeros(3, 2), adapter, torch.float32)  # the right shape replaces the base
    assert torch.equal(same, torch.ones(3, 2))


def test_a_lora_delta_of_the_wrong_shape_is_refused_naming_both_shapes():
    adapter = _adapter({"A": torch.ones(2, 4), "B": torch.ones(5, 2)}, lora={"w": LoraFactors("A", "B", scaling=1.0)})
    with pytest.raises(ValueError, match=r"^w: LoRA delta has shape \(5, 4\), base weight \(5, 3\)$"):
        merged_tensor("w", torch.zeros(5, 3), adapter, torch.float32)


def test_a_delta_that_overflows_is_refused():
    adapter = _adapter({"A": torch.full((1, 2), 3e38), "B": torch.full((2, 1), 3e38)},
                       lora={"w": LoraFactors("A", "B", scaling=1.0)})
    with pytest.raises(ValueError, match=r"^w: the merged weight has NaN/inf; the adapter looks broken$"):
        merged_tensor("w", torch.zeros(2, 2), adapter, torch.float32)


def test_folding_into_a_trained_copy_never_changes_the_copy_held_in_memory():
    """An embedding saved next to its LoRA factors: replaced first, then the delta is added, twice the same."""
    copy = torch.zeros(2, 2)
    adapter = _adapter({"copy": copy, "A": torch.ones(1, 2), "B": torch.ones(2, 1)},
                       replacements={"w": "copy"}, lora={"w": LoraFactors("A", "B", scaling=0.5)})
    first = merged_tensor("w", None, adapter, torch.float32)
    second = merged_tensor("w", None, adapter, torch.float32)
    assert torch.equal(first, torch.full((2, 2), 0.5)) and torch.equal(second, first)
    assert torch.equal(copy, torch.zeros(2, 2))


def test_non_float_tensors_keep_their_dtype():
    ids = torch.arange(6).reshape(1, 6)
    out = merged_tensor("position_ids", ids, _adapter({}), torch.bfloat16)
    assert out.dtype == torch.int64 and torch.equal(out, ids)
    assert merged_tensor("w", torch.ones(2), _adapter({}), torch.bfloat16).dtype == torch.bfloat16


def test_store_lookups_use_the_source_whose_prefix_matches(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    save_file({"x": torch.ones(3)}, str(tmp_path / "b.safetensors"))
    store = TensorStore()
    store.add_files(SafetensorsFiles([tmp_path / "a.safetensors"]), "a.")
    store.add_files(SafetensorsFiles([tmp_path / "b.safetensors"]), "b.")
    assert torch.equal(store.get("b.x"), torch.ones(3)) and store.shape("b.x") == (3,)
    assert torch.equal(store.get("a.x"), torch.zeros(2)) and store.shape("a.x") == (2,)
    for lookup in (store.get, store.shape):
        with pytest.raises(KeyError, match="c.x"):
            lookup("c.x")
