"""Shard planning and writing of the merge output, exactly (found by mutation testing, docs/TESTING.md): a shard
that fits the limit to the byte stays one shard, file names count from 1 of n, and every file carries the
`format: pt` metadata transformers checks when it loads safetensors.

    .venv/bin/python -m pytest tests/unit/merge/test_merge_shards.py -q
"""
from __future__ import annotations

import json

import torch
from safetensors import safe_open

from raytune_minicpmv.merge.safetensors_stream import INDEX_FILE, plan_shards, write_sharded

F32 = torch.float32


def _names(plan):
    return {name: [k for k, _, _ in items] for name, items in plan.files.items()}


def test_greedy_packing_to_the_byte():
    tensors = [("a", (4,), F32), ("b", (4,), F32), ("c", (8,), F32), ("d", (2,), F32)]  # 16, 16, 32, 8 bytes
    assert _names(plan_shards(tensors, 32)) == {"model-00001-of-00003.safetensors": ["a", "b"],  # 32 = the limit
                                                "model-00002-of-00003.safetensors": ["c"],
                                                "model-00003-of-00003.safetensors": ["d"]}
    assert _names(plan_shards(tensors, 72)) == {"model-00001-of-00001.safetensors": ["a", "b", "c", "d"]}
    four = [(k, (4,), F32) for k in "wxyz"]  # 16 bytes each: the second shard also fills to the byte
    assert [len(v) for v in _names(plan_shards(four, 32)).values()] == [2, 2]
    assert _names(plan_shards(tensors, 71)) == {"model-00001-of-00002.safetensors": ["a", "b", "c"],
                                                "model-00002-of-00002.safetensors": ["d"]}


def test_a_tensor_larger_than_the_limit_gets_its_own_shard():
    plan = plan_shards([("big", (100,), F32), ("small", (1,), F32)], 16)
    assert _names(plan) == {"model-00001-of-00002.safetensors": ["big"],
                            "model-00002-of-00002.safetensors": ["small"]}
    assert plan.total_bytes == 404


def test_written_files_have_pt_metadata_and_an_index(tmp_path):
    tensors = {"a": torch.arange(4, dtype=F32), "b": torch.ones(2, 3, dtype=torch.bfloat16)}
    plan = plan_shards([(k, tuple(t.shape), t.dtype) for k, t in tensors.items()], 16)
    index = write_sharded(tmp_path, plan, tensors.__getitem__)
    assert index == tmp_path / INDEX_FILE
    data = json.loads(index.read_text())
    assert data == {"metadata": {"total_size": 28}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                                   "b": "model-00002-of-00002.safetensors"}}
    for name in plan.files:
        with safe_open(str(tmp_path / name), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                assert torch.equal(f.get_tensor(key), tensors[key])
