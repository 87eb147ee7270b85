"""`raytune-minicpmv demo`: the whole chain on the embedded default (a local Ray on this machine's CPUs).

    raytune-minicpmv demo --out demo_out [key.path=value ...]      # or: make demo

It builds a tiny random-weight MiniCPM-V 2.6 checkpoint (real layout: config.json, safetensors, tokenizer,
preprocessor config) and the shipped sample dataset, then runs `configs/demo.yaml` through `run_tune`:
preprocess once (Ray Data) → 4 LoRA trials on 2 CPU workers with DeepSpeed ZeRO-3 → ASHA stops the bad learning
rates → the best trial's adapter is merged (Ray task) → the merged model is reloaded and run once as a check.
Nothing is downloaded. Rerunning with the same --out resumes/reuses what is already there.
"""
from __future__ import annotations

import time
from pathlib import Path

from .recipes import recipe_path

DEMO_CONFIG = recipe_path("demo")  # configs/demo.yaml, or the copy shipped in the wheel


def prepare_demo_inputs(out: Path) -> dict[str, str]:
    """Tiny model + sample data under `out` (idempotent). Returns the config overrides that point at them."""
    from .models import build_tiny
    from .data.sample_data import write_sample_dataset

    model_dir = out / "tiny-minicpmv2_6"
    if not (model_dir / "config.json").exists():
        build_tiny("minicpmv2_6", model_dir)
    train = write_sample_dataset(out / "data", split="train")
    evals = write_sample_dataset(out / "data", split="eval")
    return {"model.path": str(model_dir), "data.train_path": str(train), "data.eval_path": str(evals),
            "run.storage_path": str(out / "runs")}


def run_demo(out_dir: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    from .config import load_config
    from .tune.search import run_tune

    t0 = time.time()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    inputs = prepare_demo_inputs(out)
    cfg = load_config(DEMO_CONFIG, [f"{k}={v}" for k, v in inputs.items()] + list(overrides))
    summary = run_tune(cfg)
    if "merged_path" in summary:
        print(reload_check(summary["merged_path"], inputs["data.train_path"]))
    print(f"demo finished in {time.time() - t0:.0f} s; everything is under {out}")
    return summary


def reload_check(merged_path: str, train_json: str) -> str:
    """Load the merged checkpoint with the package's loader and run one real sample through it."""
    import torch

    from .models import load_model
    from .data.pipeline import preprocess_for_check

    model = load_model(merged_path, dtype=torch.float32).eval()
    batch = preprocess_for_check(merged_path, train_json)
    with torch.no_grad():
        logits = model(batch).logits
    n = sum(p.numel() for p in model.parameters())
    ok = bool(torch.isfinite(logits).all())
    return (f"reload check: {merged_path} loads ({n / 1e6:.1f} M params) and runs a sample: logits "
            f"{tuple(logits.shape)} {'finite' if ok else 'NOT FINITE'}")
