"""Data stage: MiniCPM-V fine-tune records → model-ready rows (Ray Data, CPU), and rows → batches.

    from raytune_minicpmv.data import run_preprocess, build_dataset, collate
    report = run_preprocess(cfg)             # decode, slice, template, tokenize once → Parquet + report.json
    ds = build_dataset(cfg, "train")         # a Ray Dataset of rows (preprocessed Parquet or streamed records)

Inside: `records.py` (schema, readers, bad-record rules), `images.py`, `slicing.py`, `templates.py` (chat
templates + labels), `rows.py` (the Arrow row contract), `pipeline.py` (the Ray Data wiring), `sample_data.py`;
MiniCPM-V 4.6/4.7: `family4.py` (records through transformers' processor), `rows4.py`, `pipeline4.py`.
See docs/DATA.md.
"""
from .pipeline import build_dataset, collate, preprocess_for_check, run_preprocess
from .records import BadDataError, BadRecord
from .sample_data import write_sample_dataset

__all__ = ["run_preprocess", "build_dataset", "collate", "preprocess_for_check", "write_sample_dataset",
           "BadDataError", "BadRecord"]
