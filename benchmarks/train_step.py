"""Training-step benchmark: the package's own engine and step (train.build_engine / train.train_step) on synthetic
MiniCPM-V batches, under Ray Train or under torchrun, so the two differ only by who starts the processes.

    # 1. a random-weight model: MiniCPM-V 2.6 vision tower + resampler at real dims, Qwen2-1.5B-sized LLM
    python benchmarks/train_step.py build --out /tmp/bench_model [--llm-hidden 1536 --llm-layers 28 ...]
    # 2. measure (same arguments for both launchers)
    python benchmarks/train_step.py ray --model /tmp/bench_model --workers 1 --trainable lora --out res.jsonl
    torchrun --nproc_per_node 1 benchmarks/train_step.py torchrun --model /tmp/bench_model --trainable lora ...

A synthetic sample: `--crops` image crops of 448×448 (32×32 patches each: one image sliced like a ~1344×896 photo
into a thumbnail + slices), each crop's 64 query tokens placed in the text as the data stage does (image_bound),
total length `--seq`, the last `--label-frac` of the tokens labelled. Pixels are uniform in [-1, 1].

Reported (rank 0, one JSON line appended to --out): median step time over the steps after `--warmup`, tokens/s
(real tokens, all ranks), MFU (metrics.py formula, recompute not counted), peak GPU memory per GPU.
CPU smoke run: add `--cpu` (gloo, fp32, tiny sizes via `build --tiny`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["build", "ray", "torchrun"])
    p.add_argument("--out", default="train_step.jsonl")
    p.add_argument("--model", default="/tmp/bench_model")
    p.add_argument("--tiny", action="store_true", help="build: tiny sizes (CPU smoke)")
    p.add_argument("--llm-hidden", type=int, default=1536)  # Qwen2-1.5B
    p.add_argument("--llm-layers", type=int, default=28)
    p.add_argument("--llm-heads", type=int, default=12)
    p.add_argument("--llm-kv-heads", type=int, default=2)
    p.add_argument("--llm-intermediate", type=int, default=8960)
    p.add_argument("--vocab", type=int, default=151666)
    p.add_argument("--trainable", choices=["lora", "full"], default="lora")
    p.add_argument("--zero", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=8.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--crops", type=int, default=7)
    p.add_argument("--label-frac", type=float, default=0.25)
    p.add_argument("--no-grad-ckpt", action="store_true")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--offload", choices=["none", "cpu_adam", "torch_adam"], default="none",
                   help="ZeRO optimizer offload to CPU with DeepSpeedCPUAdam (JIT build) or torch AdamW")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--tag", default="")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="torch-profile this many steps after 3 (train.profile_steps): phases, top kernels, GPU idle %%")
    return p.parse_args(argv)


def build(a) -> None:
    import torch

    t0 = time.time()
    # random init on the GPU when there is one: minutes faster than CPU init for a 2B model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with device:
        _build(a, torch)
    print(f"built {a.model} in {time.time() - t0:.1f} s", flush=True)


def _build(a, torch) -> None:
    from raytune_minicpmv.models import build_tiny

    if a.tiny:
        build_tiny("minicpmv2_6", a.model)
    else:
        build_tiny("minicpmv2_6", a.model, vision="real", llm_hidden=a.llm_hidden, llm_layers=a.llm_layers,
                   llm_heads=a.llm_heads, llm_kv_heads=a.llm_kv_heads, llm_intermediate=a.llm_intermediate,
                   vocab_size=a.vocab, dtype=torch.bfloat16)


def bench_config(a):
    from raytune_minicpmv.config import load_config

    ov = [f"model.path={a.model}", f"deepspeed.zero_stage={a.zero}", f"train.micro_batch_size={a.micro_batch}",
          f"train.max_steps={a.steps}", "optim.lr=1e-5", "optim.warmup_steps=0", "train.report_to=[]",
          f"model.gradient_checkpointing={str(not a.no_grad_ckpt).lower()}",
          f"scaling.num_workers={a.workers}", f"scaling.cpus_per_worker={a.cpus_per_worker}"]
    ov += ["scaling.use_gpu=false", f"model.dtype={a.dtype or 'fp32'}"] if a.cpu else \
        ["scaling.use_gpu=true", f"model.dtype={a.dtype or 'bf16'}"]
    if a.profile_steps:
        ov += [f"train.profile_steps={a.profile_steps}", "run.storage_path=/tmp/bench_profile"]
    if a.offload != "none":
        ov += ["deepspeed.offload_optimizer=cpu", f"deepspeed.cpu_adam={str(a.offload == 'cpu_adam').lower()}"]
    if a.trainable == "full":
        ov += ["trainable.llm=full", "trainable.resampler=full", "trainable.vision=full",
               "trainable.embed_tokens=full"]
    else:
        ov += ["trainable.llm=lora", "trainable.resampler=full", "trainable.vision=frozen", "lora.r=64",
               "lora.alpha=64"]
    return load_config(None, ov, check_paths=False)


def synthetic_batches(a, vocab: int, seed: int, pool: int = 4):
    """Endless collate-format batches (docs/ARCHITECTURE.md) with real MiniCPM-V 2.6 crop/query shapes: `pool`
    distinct batches made up front and cycled, so the loop measures the step and its launcher, not the generator
    (drawing a micro-batch's pixels on the host took ~0.1 s, a quarter of a 0.4 s step, in the training thread)."""
    import itertools

    batches = list(itertools.islice(_fresh_batches(a, vocab, seed), pool))
    return itertools.cycle(batches)


def _fresh_batches(a, vocab: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    q, grid = 64, 32
    while True:
        ids, labels, pix, tgts, bounds = [], [], [], [], []
        for _ in range(a.micro_batch):
            x = torch.randint(10, vocab, (a.seq,), generator=g)
            spans, pos = [], 8
            for _ in range(a.crops):  # <image>/<slice> tag, Q placeholder tokens, closing tag
                spans.append([pos, pos + q])
                pos += q + 4
            lab = torch.full((a.seq,), -100)
            start = int(a.seq * (1 - a.label_frac))
            lab[start:] = x[start:]
            ids.append(x)
            labels.append(lab)
            pix.append([torch.rand(3, 14, grid * grid * 14, generator=g) * 2 - 1 for _ in range(a.crops)])
            tgts.append(torch.tensor([[grid, grid]] * a.crops, dtype=torch.int32))
            bounds.append(torch.tensor(spans, dtype=torch.long))
        yield {"input_ids": torch.stack(ids), "labels": torch.stack(labels),
               "attention_mask": torch.ones(a.micro_batch, a.seq, dtype=torch.long),
               "position_ids": torch.arange(a.seq).expand(a.micro_batch, -1).clone(),
               "pixel_values": pix, "tgt_sizes": tgts, "image_bound": bounds,
               "num_images": torch.ones(a.micro_batch, dtype=torch.long)}  # one image per sample, sliced in crops


def bench_worker(args_dict: dict) -> dict:
    """Runs on every rank (Ray Train worker or torchrun process). Same code for both launchers."""
    import torch
    import torch.distributed as dist

    from raytune_minicpmv.train.metrics import FlopModel, ThroughputMeter, peak_flops
    from raytune_minicpmv.models import trainable_parameter_counts
    from raytune_minicpmv.train.worker import build_engine, train_step

    a = argparse.Namespace(**args_dict)
    cfg = bench_config(a)
    t0 = time.time()
    engine, model = build_engine(cfg)
    build_s = time.time() - t0
    rank, world = dist.get_rank(), dist.get_world_size()
    vocab = model.get_base_model().config.vocab_size if hasattr(model, "get_base_model") else model.config.vocab_size
    batches = synthetic_batches(a, vocab, seed=rank)
    meter = ThroughputMeter(FlopModel.from_model(model), 0.0 if a.cpu else peak_flops(), world)
    times, losses = [], []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for step in range(a.steps):
        loss_sum, counts, step_s, wait_s, _ = train_step(engine, batches, cfg, world)
        losses.append(float(loss_sum) / max(counts.label_tokens / world, 1))
        if step == a.warmup - 1:
            meter.snapshot()  # drop the warmup window
            meter.start()  # rates are over wall-clock time from here
        elif step >= a.warmup:
            meter.add_step(counts, step_s, wait_s)
            times.append(step_s)
    snap = meter.snapshot()
    counts = trainable_parameter_counts(model)
    res = {"tag": a.tag, "launcher": a.mode, "trainable": a.trainable, "zero": a.zero, "world": world,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "seq": a.seq, "crops": a.crops, "micro_batch": a.micro_batch,
           "grad_ckpt": not a.no_grad_ckpt, "median_step_s": statistics.median(times),
           "tokens_per_s": snap["tokens_per_s"], "mfu": snap["mfu"], "tflops_per_gpu": snap["tflops_per_gpu"],
           "peak_gpu_mem_gib": snap.get("peak_gpu_mem_gib"), "peak_rss_gib": snap["peak_rss_gib"],
           "data_wait_frac": snap["data_wait_frac"], "trainable_params": counts["total"],
           "first_loss": losses[0], "last_loss": losses[-1], "engine_build_s": build_s,
           "omp_threads": torch.get_num_threads()}
    if rank == 0:
        with open(a.out, "a") as f:
            f.write(json.dumps(res) + "\n")
        print("RESULT " + json.dumps(res), flush=True)
    return res


def _ray_worker(args_dict: dict) -> None:
    import ray.train

    res = bench_worker(args_dict)
    ray.train.report({k: v for k, v in res.items() if isinstance(v, (int, float))})


def run_ray(a) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raytune_minicpmv.cluster.ray_session import runtime_env_vars

    cfg = bench_config(a)
    env = runtime_env_vars(cfg)
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "") + os.pathsep + REPO
    ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": env})
    t0 = time.time()
    TorchTrainer(_ray_worker, train_loop_config=vars(a),
                 torch_config=TorchConfig(backend="gloo" if a.cpu else "nccl"),
                 scaling_config=ScalingConfig(num_workers=a.workers, use_gpu=not a.cpu,
                                              resources_per_worker=cfg.worker_resources),
                 run_config=RunConfig(name=f"bench-{int(time.time())}",
                                      storage_path=os.path.abspath("/tmp/bench_ray_results"))).fit()
    print(f"ray fit wall {time.time() - t0:.1f} s", flush=True)
    ray.shutdown()


def main(argv=None) -> None:
    a = parse(argv)
    if a.cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if a.mode == "build":
        build(a)
    elif a.mode == "ray":
        run_ray(a)
    else:  # torchrun: the process group comes from torchrun's environment (deepspeed.init_distributed)
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        bench_worker(vars(a))


if __name__ == "__main__":
    main()
