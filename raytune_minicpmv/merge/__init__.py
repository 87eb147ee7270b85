"""Merge stage: fold a trained adapter (LoRA deltas + fully trained modules) into the base checkpoint.

    from raytune_minicpmv.merge import run_merge
    run_merge(base_dir, adapter_dir, out_dir, cfg.merge)   # a Ray task; streamed, verified, published atomically

Inside: `merger.py` (the task and publish), `adapter.py` (reading adapters, the merge math),
`safetensors_stream.py` (streamed sharded reads/writes), `verify.py` (logits vs the adapter-on-base model).
See docs/MERGE.md.
"""
from .merger import merge_adapter, run_merge

__all__ = ["run_merge", "merge_adapter"]
