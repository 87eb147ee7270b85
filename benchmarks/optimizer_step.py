"""What DeepSpeed's gradient handling and optimizer step cost, per ZeRO stage, for the 2.6 recipe's trainable set.

    python benchmarks/optimizer_step.py [--stages 0,1,2,3] [--steps 8] [--profile-stage 0] [--out res.jsonl]
    python benchmarks/optimizer_step.py --cpu --scale 0.05     # CPU smoke run (gloo, fp32, shapes scaled down)

No model and no data: the 617 trainable tensors of the issue-12 recipe at their real shapes (SigLIP-400M vision
tower and 2.6 resampler fully trained, LoRA r64 on the Qwen2-1.5B-dims LLM's q/k/v: 0.44 B parameters) in one
module whose "forward" is sum(p * c) over them (one cheap elementwise kernel each, one submodule per tensor), so
that ZeRO-3 gathers and releases each in forward and backward, `engine.backward` runs DeepSpeed's real gradient
hooks and reduction and `engine.step` its real optimizer path, with our engine
config (train/engine.py: bf16, clipping 1.0, torch AdamW fused on CUDA) and `train/ds_fixes.py` on or off.

Per stage (one process, one GPU, NCCL world of 1), ZeRO-3 also with every parameter persistent
(`deepspeed.param_persistence_threshold=1e10`): median ms of the forward, `engine.backward` and `engine.step` (each
closed by a CUDA synchronize), host→device synchronisations counted by torch's sync debug mode in one step, and
with `--profile-stage S` the top host operators of one step of stage S. Reading: compare the step's ms with the
GPU's floor for this size (AdamW reads/writes ≈ 18 bytes per parameter: ≈ 8 GB, ≈ 2 ms at 4.8 TB/s).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def trainable_shapes(scale: float = 1.0) -> list[tuple[int, ...]]:
    """The recipe's trainable tensors: vision tower (27 layers), resampler (64 queries), LoRA r64 q/k/v (28 layers)."""
    def s(n):  # scaled widths for CPU smoke runs
        return max(1, int(n * scale))

    h, mlp, llm, kv, r = s(1152), s(4304), s(1536), s(256), s(64) if scale < 1 else 64
    shapes: list[tuple[int, ...]] = [(h, 3, 14, 14), (h,), (s(4900), h), (h,), (h,)]  # patch conv, pos emb, post LN
    for _ in range(27):
        shapes += [(h, h), (h,)] * 4 + [(h,), (h,), (h,), (h,)] + [(mlp, h), (mlp,), (h, mlp), (h,)]
    shapes += [(64, llm), (llm, h), (3 * llm, llm), (3 * llm,), (llm, llm), (llm,)] + [(llm,)] * 6 + [(llm, llm)]
    for _ in range(28):
        shapes += [(r, llm), (llm, r), (r, llm), (kv, r), (r, llm), (kv, r)]
    return shapes


def build(shapes, device, dtype):
    """One submodule per tensor (so ZeRO-3 gathers and releases each one in forward and backward, like a model's
    617 parametrised modules), forward = sum(p * c)."""
    import torch

    class Holder(torch.nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.p = torch.nn.Parameter(torch.randn(shape, device=device, dtype=dtype) * 0.02)

        def forward(self, c):
            return (self.p * c).sum()

    class Trainables(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.parts = torch.nn.ModuleList(Holder(sh) for sh in shapes)
            self.register_buffer("c", torch.tensor(1e-3, device=device, dtype=dtype))

        def forward(self):
            return sum(m(self.c) for m in self.parts)

    return Trainables()


def config(stage: int, cpu: bool, dtype: str, persist: bool = False):
    from raytune_minicpmv.config.loading import replace
    from raytune_minicpmv.config.schema import Config

    ds = {"zero_stage": stage} | ({"param_persistence_threshold": 1e10} if persist else {})
    return replace(Config(), deepspeed=ds, model={"dtype": dtype},
                   scaling={"use_gpu": not cpu}, train={"micro_batch_size": 1})


def measure(stage: int, a, fixes: bool, persist: bool = False) -> dict:
    import deepspeed
    import torch

    from raytune_minicpmv.train import ds_fixes
    from raytune_minicpmv.train.engine import build_ds_config, build_lr_scheduler, build_optimizer

    os.environ[ds_fixes.ENV] = "1" if fixes else "0"
    ds_fixes.apply_ds_fixes() if fixes else ds_fixes.remove_ds_fixes()
    cfg = config(stage, a.cpu, a.dtype, persist)
    device = torch.device("cpu") if a.cpu else torch.device("cuda", 0)
    dtype = torch.float32 if a.dtype == "fp32" else torch.bfloat16
    shapes = trainable_shapes(a.scale)
    if stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=build_ds_config(cfg)):
            model = build(shapes, device, dtype)
    else:
        model = build(shapes, device, dtype)
    opt = build_optimizer(model, cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=build_ds_config(cfg),
                                      lr_scheduler=build_lr_scheduler(opt, cfg.optim, 10**6))
    sync = (lambda: None) if a.cpu else torch.cuda.synchronize
    fwd, back, step = [], [], []
    for i in range(a.steps + 2):
        sync()
        tf = time.perf_counter()
        loss = engine()
        sync()
        t0 = time.perf_counter()
        engine.backward(loss)
        sync()
        t1 = time.perf_counter()
        syncs = _count_syncs(engine.step, a.cpu) if i == a.steps + 1 else (engine.step(), 0)[1]
        sync()
        t2 = time.perf_counter()
        if 2 <= i <= a.steps:  # two warm-up steps
            fwd.append(t0 - tf)
            back.append(t1 - t0)
            step.append(t2 - t1)
    prof = _profile(engine, sync) if a.profile_stage == stage else ""
    n = sum(int(torch.Size(s).numel()) for s in shapes)
    row = {"stage": stage, "fixes": fixes, "persist": persist, "tensors": len(shapes), "params": n,
           "forward_ms": 1e3 * statistics.median(fwd), "backward_ms": 1e3 * statistics.median(back), "step_ms": 1e3 * statistics.median(step),
           "syncs_per_step": syncs, "device": "cpu" if a.cpu else torch.cuda.get_device_name(0)}
    engine.destroy()
    del engine, model, opt
    if not a.cpu:
        torch.cuda.empty_cache()
    return row | ({"profile": prof} if prof else {})


def _count_syncs(fn, cpu: bool) -> int:
    """Synchronising CUDA calls in fn(), as torch's sync debug mode reports them (one warning each)."""
    import torch

    if cpu:
        fn()
        return 0
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


def _profile(engine, sync) -> str:
    from torch.profiler import ProfilerActivity, profile

    loss = engine()
    engine.backward(loss)
    sync()
    with profile(activities=[ProfilerActivity.CPU]) as p:
        engine.step()
        sync()
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--profile-stage", type=int, default=-1)
    p.add_argument("--no-unfixed", action="store_true", help="skip the ds_fixes-off rows")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 with --cpu")
    p.add_argument("--scale", type=float, default=1.0, help="widths x this (CPU smoke runs)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    a.dtype = a.dtype or ("fp32" if a.cpu else "bf16")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if a.cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if a.cpu else "nccl")
    rows = []
    for stage in (int(x) for x in a.stages.split(",")):
        runs = [(f, False) for f in ((True,) if a.no_unfixed else (False, True))]
        for fixes, persist in runs + ([(True, True)] if stage == 3 else []):
            row = measure(stage, a, fixes, persist)
            rows.append(row)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps({k: v for k, v in row.items() if k != "profile"}) + "\n")
            print(f"ZeRO-{row['stage']}{' persistent' if persist else ''} ds_fixes={'on ' if fixes else 'off'} "
                  f"{row['tensors']} tensors {row['params'] / 1e9:.3f} B: forward {row['forward_ms']:7.1f} ms  "
                  f"backward {row['backward_ms']:7.1f} ms  step {row['step_ms']:7.1f} ms"
                  f"  syncs/step {row['syncs_per_step']}", flush=True)
            if "profile" in row:
                print(row["profile"], flush=True)


if __name__ == "__main__":
    main()
