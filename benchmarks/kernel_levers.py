"""The kernel levers alone (no Ray, no DeepSpeed): forward + backward of the issue-12 model on seed-shaped synthetic
micro-batches, one row per lever, in one process on one GPU.

    python benchmarks/kernel_levers.py --model /tmp/bench/model [--micro-batch 8 --steps 8 --warmup 3] [--levers ...]
    python benchmarks/kernel_levers.py --build /tmp/bench/model      # build the 2.21 B workload model first (workload.py)

A micro-batch: `--micro-batch` samples of `--seq` tokens, each with 7 crops of the real 2.6 slicing grids
(≈ 1024 patches: 32×32, 37×28, 28×37, 39×26, 35×29, 26×39 plus a thumbnail-sized one), 64 query tokens per crop
placed as the data stage does, the last `--label-frac` of each sample's tokens labelled. Trainable as in
issue 12: LoRA r64 on the LLM's q/k/v, vision tower and resampler full (PEFT), bf16, no gradient checkpointing.

Per lever setting: median ms of forward + backward (synchronised), peak allocated GiB. Liger patches module
functions globally (RoPE), so the settings with Liger run last.
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
GRIDS = [(32, 32), (37, 28), (28, 37), (39, 26), (35, 29), (26, 39), (24, 32)]
LEVERS = {  # name -> (vision_varlen, fused_ce, liger)
    "all_off": (False, False, False),
    "varlen": (True, False, False),
    "fused_ce": (False, True, False),
    "varlen+fused_ce": (True, True, False),
    "varlen+fused_ce+liger": (True, True, True),
}


def make_batch(mb: int, seq: int, label_frac: float, query: int, seed: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(vocab, 100000), (mb, seq), generator=g)
    labels = ids.clone()
    labels[:, : int(seq * (1 - label_frac))] = -100
    pix, sizes, bounds = [], [], []
    for i in range(mb):
        grids = [GRIDS[(i + k) % len(GRIDS)] for k in range(len(GRIDS))]
        pix.append([torch.rand(3, 14, h * w * 14, generator=g) * 2 - 1 for h, w in grids])
        sizes.append(torch.tensor(grids, dtype=torch.int32))
        bounds.append(torch.tensor([[4 + k * (query + 4), 4 + k * (query + 4) + query] for k in range(len(grids))]))
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "position_ids": torch.arange(seq).repeat(mb, 1), "pixel_values": pix, "tgt_sizes": sizes,
            "image_bound": bounds}


def to_device(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    return obj


def measure(model_dir: str, lever: str, a) -> dict:
    from raytune_minicpmv.config.schema import LoraConfig, TrainableConfig
    from raytune_minicpmv.models import apply_trainable_policy, load_model
    from raytune_minicpmv.models.kernels import configure_kernels
    from raytune_minicpmv.models.loss import batch_loss

    varlen, fused, liger = LEVERS[lever]
    dev = "cpu" if a.cpu else "cuda"
    sync = (lambda: None) if a.cpu else torch.cuda.synchronize
    model = load_model(model_dir, dtype=torch.float32 if a.cpu else torch.bfloat16)
    switches = type("M", (), {"vision_varlen": varlen, "fused_ce": fused, "liger": liger,
                              "sdpa_kernel": a.sdpa_kernel, "vision_attention": "grouped"})()
    plan = configure_kernels(model, switches, use_gpu=not a.cpu)
    torch.manual_seed(0)
    model = apply_trainable_policy(model, TrainableConfig(vision="full", resampler="full", llm="lora"),
                                   LoraConfig(r=64, alpha=64, dropout=0.0, target_modules=
                                              r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj)"))
    model.to(dev).train()
    mcfg = model.get_base_model().config
    batches = [to_device(make_batch(a.micro_batch, a.seq, a.label_frac, mcfg.query_num, s, mcfg.vocab_size), dev)
               for s in range(2)]
    if not a.cpu:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(a.warmup + a.steps):
        b = batches[step % 2]
        sync()
        t0 = time.perf_counter()
        total, count = batch_loss(model, b, fused=plan.fused_ce)
        (total / count).backward()
        sync()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
            losses.append(float(total / count))
        model.zero_grad(set_to_none=True)
    row = {"lever": lever, "plan": plan.describe(), "ms": 1e3 * statistics.median(times),
           "samples_per_s": a.micro_batch / statistics.median(times), "loss": losses[0],
           "peak_gib": 0.0 if a.cpu else torch.cuda.max_memory_allocated() / 2**30}
    del model, batches
    if not a.cpu:
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/tmp/bench/model")
    p.add_argument("--sdpa-kernel", default="auto", choices=["auto", "cudnn", "flash"],
                   help="model.sdpa_kernel for every row (auto = flash on CUDA; the first table ran with cudnn)")
    p.add_argument("--build", default=None, help="build the workload model into this folder and exit")
    p.add_argument("--tokenizer", default=str(REPO / "tests" / "assets" / "minicpmv26_tokenizer"))
    p.add_argument("--llm-layers", type=int, default=None, help="--build: LLM layers (default: the workload's 28)")
    p.add_argument("--levers", default=",".join(LEVERS))
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=680)
    p.add_argument("--label-frac", type=float, default=0.26)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--cpu", action="store_true", help="smoke run on CPU (fp32; give a tiny --model)")
    a = p.parse_args(argv)
    if a.build:
        import workload

        if a.llm_layers:  # a shorter LLM (same widths, vocab and vision tower): a quick look on a short lease
            dims = {**workload.MODEL_DIMS, "llm_layers": a.llm_layers}
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
                from raytune_minicpmv.models import build_tiny

                build_tiny("minicpmv2_6", a.build, tokenizer=a.tokenizer, dtype=torch.bfloat16, **dims)
            print("model:", a.build, dims, flush=True)
            return
        print("model:", workload.build_model(Path(a.build), a.tokenizer), flush=True)
        return
    names = [n for n in a.levers.split(",") if n]
    names = [n for n in names if not LEVERS[n][2]] + [n for n in names if LEVERS[n][2]]  # Liger last (global)
    rows = []
    for name in names:
        try:
            row = measure(a.model, name, a)
        except Exception as e:  # noqa: BLE001 - one lever failing (e.g. Liger missing) leaves the other rows
            row = {"lever": name, "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    base = next((r["ms"] for r in rows if r.get("lever") == "all_off" and "ms" in r), None)
    print(f"\n{'lever':<24}{'ms fwd+bwd':>12}{'samples/s':>11}{'peak GiB':>10}{'vs all_off':>12}  loss")
    for r in rows:
        if "ms" not in r:
            print(f"{r['lever']:<24}ERROR {r['error']}")
            continue
        rel = f"{base / r['ms']:.2f}x" if base else ""
        print(f"{r['lever']:<24}{r['ms']:>12.1f}{r['samples_per_s']:>11.2f}{r['peak_gib']:>10.1f}{rel:>12}  "
              f"{r['loss']:.4f}")


if __name__ == "__main__":
    main()
