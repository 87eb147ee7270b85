"""MiniCPM-V 4.6 / 4.7 training steps on one GPU without Ray or DeepSpeed: the package's own data rows
(transformers' processor via `data.rows4`), collate, trainable policy and loss, with torch's fused AdamW.

    python benchmarks/v4_step.py --family minicpmv4_6 --work /tmp/v4 [--micro-batch 4 --steps 15 --warmup 4]
    python benchmarks/v4_step.py --family minicpmv4_7 --work /tmp/v4 --cpu        # tiny-model smoke run on CPU

Why no Ray here: MiniCPM-V 4.x training needs transformers >= 5.19 (models/registry.py `V4_MIN_TRANSFORMERS`),
the GPU machine has 5.17, and the newer transformers wheel (13.5 MB) plus the ray + deepspeed bundle (51 MB) plus the
repo exceed the 64 MiB a device call may carry. So this measures the model side of a step (forward, backward,
optimizer) on the rows the data stage makes; the Ray Train + DeepSpeed path for 4.x is the one the CPU tests run.

Workload: benchmarks/workload.py `build_model_v46` (4.6 dims: Qwen3.5-0.8B text + SigLIP2-400M, random bf16)
and the issue-12 seed-shaped records (640×480 … 1344×1344 JPEGs, 1-3 turns). Trainable as issue 12: LoRA r64 on the
LLM's attention inputs (full-attention q/k/v and linear-attention in_proj_qkv / in_proj_z), vision tower and
merger fully trained. Prints one line per setting: median step s, samples/s, real tokens/s, crops/sample, peak GiB.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
LORA = r"model\.language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj)|linear_attn\.(in_proj_qkv|in_proj_z))"


def make_rows(work: Path, family: str, n: int, max_length: int):
    from raytune_minicpmv.data.family4 import Spec4
    from raytune_minicpmv.data.records import read_raw_records
    from raytune_minicpmv.data.rows4 import preprocess_records4, rows_to_table4

    import workload

    path = workload.write_records(work / "data", n)
    info = Spec4(family=family, model_path=str(work / "model")).load()
    t0 = time.perf_counter()
    rows = preprocess_records4(list(read_raw_records(path)), info,
                               family, max_length)
    table = rows_to_table4([r for r in rows if not r.skip_reason])
    print(f"rows: {table.num_rows} in {time.perf_counter() - t0:.1f} s (one process)", flush=True)
    return table


def batches(table, mb: int):
    from raytune_minicpmv.data.rows4 import collate_rows4

    for i in range(0, table.num_rows - mb + 1, mb):
        yield collate_rows4(table.slice(i, mb).to_pydict())


def to_device(b: dict, dev) -> dict:
    return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()}


def run(a) -> dict:
    from raytune_minicpmv.config.schema import LoraConfig, TrainableConfig
    from raytune_minicpmv.models import apply_trainable_policy, load_model
    from raytune_minicpmv.models.loss import batch_loss

    dev = torch.device("cpu" if a.cpu else "cuda")
    sync = (lambda: None) if a.cpu else torch.cuda.synchronize
    work = Path(a.work) / a.family
    if a.cpu:
        from raytune_minicpmv.models.tiny_v4 import build_tiny_v4

        if not (work / "model" / "config.json").exists():
            build_tiny_v4(a.family, work / "model")
    else:
        import workload

        workload.build_model_v46(work / "model", a.family)
    table = make_rows(work, a.family, a.records, a.max_length)
    model = load_model(work / "model", dtype=torch.float32 if a.cpu else torch.bfloat16)
    model = apply_trainable_policy(model, TrainableConfig(llm="lora", vision="full", resampler="full"),
                                   LoraConfig(r=64, alpha=64, dropout=0.0, target_modules=LORA)).to(dev).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=not a.cpu)
    data = [to_device(b, dev) for b in batches(table, a.micro_batch)]
    if not a.cpu:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(a.warmup + a.steps):
        b = data[step % len(data)]
        sync()
        t0 = time.perf_counter()
        total, count = batch_loss(model, b, False, a.family, "16x")
        (total / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(total.detach() / count))
    med = statistics.median(times)
    tokens = statistics.mean(float(b["attention_mask"].sum()) for b in data)
    crops = statistics.mean(len(b["target_sizes"]) for b in data if "target_sizes" in b)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"family": a.family, "device": "cpu" if a.cpu else torch.cuda.get_device_name(),
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "params_b": sum(p.numel() for p in model.parameters()) / 1e9, "trainable_m": trainable / 1e6,
            "micro_batch": a.micro_batch, "median_step_s": med, "samples_per_s": a.micro_batch / med,
            "tokens_per_s": tokens / med, "tokens_per_sample": tokens / a.micro_batch,
            "crops_per_sample": crops / a.micro_batch, "first_loss": losses[0], "last_loss": losses[-1],
            "peak_gib": 0.0 if a.cpu else torch.cuda.max_memory_allocated() / 2**30}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="minicpmv4_6", choices=["minicpmv4_6", "minicpmv4_7"])
    p.add_argument("--work", default="/tmp/v4")
    p.add_argument("--records", type=int, default=48)
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--out", default=None)
    p.add_argument("--cpu", action="store_true", help="smoke run: tiny model on CPU")
    a = p.parse_args(argv)
    if a.cpu:
        a.records, a.micro_batch, a.steps, a.warmup = min(a.records, 4), min(a.micro_batch, 2), 2, 1
    row = run(a)
    print("RESULT " + json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
