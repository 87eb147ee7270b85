"""The model's forward builds no KV cache: training and evaluation run the whole sequence once, and a cache
there would only hold every layer's keys and values in memory (the LLM config's `use_cache` is true).

Found by mutation testing (docs/TESTING.md): dropping `use_cache=False` changed no logits, so no test saw it.

Run: pytest tests/unit/models/test_model_forward_cache.py   (~3 s)
"""
from __future__ import annotations

import torch

from raytune_minicpmv.models import build_tiny, load_model

Q = 16


def test_forward_returns_logits_and_no_kv_cache(tmp_path):
    model = load_model(build_tiny("minicpmv2_6", tmp_path, query_num=Q), dtype=torch.float32).eval()
    assert model.llm.config.use_cache is True  # the default a cache would come from
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model({"input_ids": ids, "position_ids": torch.arange(12).repeat(2, 1)})
    assert out.logits.shape[:2] == (2, 12)
    assert out.past_key_values is None
