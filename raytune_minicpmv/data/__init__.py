"""Data stage: MiniCPM-V fine-tune records → model-ready rows (Ray Data, CPU), and rows → batches.

    from raytune_minicpmv.data import run_preprocess, build_dataset, collate
    report = run_preprocess(cfg)             # decode, slice, template, tokenize once → Parquet + report.json
    ds = build_dataset(cfg, "train")         # a Ray Dataset of rows (preprocessed Parquet or streamed records)

Inside: `records.py` (schema, readers, bad-record rules), `images.py`, `slicing.py`, `templates.py` (chat
templates + labels), `rows.py` (the Arrow row contract), `pipeline.py` (the Ray Data wiring), `sample_data.py`;
MiniCPM-V 4.6/4.7: `family4.py` (records through transformers' processor), `rows4.py`, `pipeline4.py`.
See docs/DATA.md.
"""
import importlib

# Resolved on first use (PEP 562), so that importing a submodule (`data.rows4`, `data.records`, ...) does not import
# the Ray Data wiring in `pipeline.py`: the row code runs where Ray is not installed (benchmarks/v4_step.py on a GPU
# machine without ray, a notebook).
_EXPORTS = {"run_preprocess": "pipeline", "build_dataset": "pipeline", "collate": "pipeline",
            "preprocess_for_check": "pipeline", "write_sample_dataset": "sample_data",
            "BadDataError": "records", "BadRecord": "records"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
