"""The 4.6 / 4.7 hooks of the Ray Data stage: which family a run is, its model side, its map_batches actor.

    spec = model_side4(cfg)          # Spec4, or None for a 2.x model (then pipeline.py's 2.x path runs)
    ds.map_batches(Preprocessor4, fn_constructor_kwargs=dict(spec=spec.__dict__, tokenizer_path=..., ...))

The family is the checkpoint's config.json `model_type` (`minicpmv4_6` / `minicpmv4_7`), else `model.family`.
Everything else of pipeline.py (driver checks, report, Parquet, tombstones, skip cap) is shared with 2.x.
"""
from __future__ import annotations

from typing import Optional

from .family4 import Spec4
from .records import RawRecord
from .rows4 import preprocess_records4, rows_to_table4

FAMILIES4 = ("minicpmv4_6", "minicpmv4_7")


def family4(model_cfg) -> Optional[str]:
    """'minicpmv4_6' / 'minicpmv4_7' for a run's ModelConfig (checkpoint's model_type first), else None."""
    from ..models.processor4 import family4_of

    if model_cfg.path:
        found = family4_of(model_cfg.path)
        if found:
            return found
    return model_cfg.family if model_cfg.family in FAMILIES4 else None


def model_side4(cfg) -> Optional[Spec4]:
    fam = family4(cfg.model)
    if fam is None:
        return None
    return Spec4(family=fam, model_path=str(cfg.model.path),
                 downsample_mode=getattr(cfg.model, "downsample_mode", "16x"),
                 max_slice_nums=int(cfg.data.max_slice_nums))


class Preprocessor4:
    """The `map_batches` actor for 4.6/4.7: loads transformers' processor once, turns raw records into rows."""

    def __init__(self, spec: dict, tokenizer_path: str, max_length: int, on_bad_record: str):
        self.spec = Spec4(**spec)
        self.info = self.spec.load(tokenizer_path)
        self.max_length, self.on_bad_record = max_length, on_bad_record

    def __call__(self, batch):
        raws = [RawRecord(s, int(i), t, e) for s, i, t, e in zip(
            *(batch.column(c).to_pylist() for c in ("source", "index", "text", "error")))]
        return rows_to_table4(preprocess_records4(raws, self.info, self.spec.family, self.max_length,
                                                  self.on_bad_record))
