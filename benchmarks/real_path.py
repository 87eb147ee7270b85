"""The real path, measured as a user sees it: `raytune-minicpmv preprocess`, then `raytune-minicpmv train` (Ray
Train + DeepSpeed, the CLI in a subprocess, exactly the user's command) for a list of named settings, one table.

    python benchmarks/real_path.py --work /tmp/bench --out results.jsonl [--settings seed_like,recommended,...]
    python benchmarks/real_path.py --work /tmp/bench --profile recommended     # + `train --profile` of a setting
    python benchmarks/real_path.py --settings zero0_mb8,packed5k_sdpa,packed5k_varlen --budget-s 420
                                   # packing off/on in one 10-min call (≈ 150 s a setting after the workload);
                                   # benchmarks/packed_attention.py compares the backends without Ray in ~1 min
    python benchmarks/real_path.py --work /tmp/bench --settings levers_on,varlen_off,fused_ce_off,liger_off
    python benchmarks/real_path.py --work /tmp/bench --settings levers_flash,levers_cudnn,levers_varlen
                                            # the attention kernels: flash SDPA / cuDNN SDPA / varlen vision
    python benchmarks/real_path.py --work /tmp/bench --settings zero2_mb2,qlora_zero2_mb2,zero2_mb8,qlora_zero2_mb8
                                            # bf16 LoRA vs QLoRA (NF4) at the same engine and batch: memory, step time

Workload: benchmarks/workload.py (2.21 B MiniCPM-V-2.6-shaped model, seed-shaped records), LoRA r64 on q/k/v, the
vision tower and resampler fully trained, bf16, one Ray Train worker per GPU with 12 CPUs.

What is measured, per setting (all from what the DRIVER sees):
* wall s/step: the driver stamps each progress line (`step N | loss ...`, one per report, every
  `logging_steps`) when it reaches the driver's stdout; wall s/step = (t(last report) − t(first report at or after
  step `--skip`)) / (steps between). It contains everything a step costs a user (data wait, reports, logging,
  the Ray report round trip) and none of the fixed start-up (Ray, workers, model load, first steps) or the final
  evaluation and save (the report at max_steps is left out). Ray forwards worker output with ~0.1 s latency,
  so windows are kept ≥ 15 s long.
* samples/s, real tokens/s, trained tokens/s: the counts of the same window (the worker's metrics.jsonl) over the
  driver's wall time of the window;
* MFU = model FLOPs of the window / driver wall time / (GPUs × 989 TFLOP/s dense bf16 H200 peak); model FLOPs
  are metrics.FlopModel's (LLM 2·N·T + causal attention, vision tower 2·N·P + full attention per crop,
  resampler, backward 1× activations + weight-gradient FLOPs of trainable tensors only; vision counted,
  recompute NOT counted);
* peak GPU memory (allocator peak, GiB), data-wait fraction (worker time in next(batch) / step time), the worker's
  own mean step time, fixed start-up = fit wall − steps × wall s/step, and the engine the run chose.

Reports block on the Train controller's poll (2 s by default; issue 7): every run here sets
RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 and reports every 5 steps, so the stall is < 0.04 s per step.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
PEAK = 989e12
LINE = re.compile(r"step (\d+)(?:/\d+)? \| loss")  # "step 5/25 | loss ..." (progress.format_log_line)

# name -> (overrides, max_steps). Steps: long enough for a >= 15 s measured window after the first 5 steps.
SETTINGS = {
    "seed_like": (["deepspeed.zero_stage=3", "model.gradient_checkpointing=true", "train.micro_batch_size=2"], 30),
    "zero2_ckpt_mb2": (["deepspeed.zero_stage=2", "model.gradient_checkpointing=true",
                        "train.micro_batch_size=2"], 40),
    "zero2_mb2": (["deepspeed.zero_stage=2", "model.gradient_checkpointing=false", "train.micro_batch_size=2"], 45),
    "zero0_mb2": (["deepspeed.zero_stage=0", "model.gradient_checkpointing=false", "train.micro_batch_size=2"], 45),
    "zero1_mb2": (["deepspeed.zero_stage=1", "model.gradient_checkpointing=false", "train.micro_batch_size=2"], 45),
    "zero2_mb8": (["deepspeed.zero_stage=2", "model.gradient_checkpointing=false", "train.micro_batch_size=8"], 25),
    "zero0_mb8": (["deepspeed.zero_stage=0", "model.gradient_checkpointing=false", "train.micro_batch_size=8"], 25),
    "zero0_vckpt_mb8": (["deepspeed.zero_stage=0", "model.gradient_checkpointing=vision",
                         "train.micro_batch_size=8"], 25),
    "recommended": (["deepspeed.zero_stage=auto", "model.gradient_checkpointing=auto", "train.micro_batch_size=8"],
                    25),
    "auto_mb2": (["deepspeed.zero_stage=auto", "model.gradient_checkpointing=auto", "train.micro_batch_size=2"], 45),
    "auto_mb4": (["deepspeed.zero_stage=auto", "model.gradient_checkpointing=auto", "train.micro_batch_size=4"], 30),
    # issue 12 item 3, against zero0_mb8 (same engine, ~8 samples a micro-batch): a token budget of 5632 (≈ 8.3
    # seed-shaped samples) as padded length-bucketed batches, and as packed rows with each attention backend
    "budget5k_z0": (["deepspeed.zero_stage=0", "model.gradient_checkpointing=false", "train.micro_batch_size=1",
                     "train.max_tokens_per_batch=5632"], 25),
    **{f"packed5k_{b}": (["deepspeed.zero_stage=0", "model.gradient_checkpointing=false", "train.micro_batch_size=1",
                          "train.max_tokens_per_batch=5632", "data.packing=true", f"model.packed_attention={b}"], 25)
       for b in ("sdpa", "flex", "varlen")},
    # every weight trained (2.21 B): the full fine-tune recipe's engine choice
    "full_recommended": (["trainable.llm=full", "trainable.embed_tokens=full", "deepspeed.zero_stage=auto",
                          "model.gradient_checkpointing=auto", "train.micro_batch_size=8"], 25),
    "full_zero3_ckpt_mb2": (["trainable.llm=full", "trainable.embed_tokens=full", "deepspeed.zero_stage=3",
                             "model.gradient_checkpointing=true", "train.micro_batch_size=2"], 30),
    # QLoRA (issue 14): the bf16-LoRA settings above with the LLM's linears in bitsandbytes NF4 / int8 (vision tower,
    # resampler, embeddings, lm_head stay bf16): compare e.g. zero2_mb8 with qlora_zero2_mb8 (needs bitsandbytes;
    # benchmarks/strip_bnb_wheel.py makes a ~4 MB one-CUDA wheel for the GPU machine)
    "qlora_zero2_ckpt_mb2": (["model.quantization=nf4", "deepspeed.zero_stage=2", "model.gradient_checkpointing=true",
                              "train.micro_batch_size=2"], 40),
    "qlora_zero2_mb2": (["model.quantization=nf4", "deepspeed.zero_stage=2", "model.gradient_checkpointing=false",
                         "train.micro_batch_size=2"], 45),
    "qlora_zero2_mb8": (["model.quantization=nf4", "deepspeed.zero_stage=2", "model.gradient_checkpointing=false",
                         "train.micro_batch_size=8"], 25),
    "qlora_int8_zero2_mb8": (["model.quantization=int8", "deepspeed.zero_stage=2",
                              "model.gradient_checkpointing=false", "train.micro_batch_size=8"], 25),
    "qlora_recommended": (["model.quantization=nf4", "deepspeed.zero_stage=auto", "model.gradient_checkpointing=auto",
                           "train.micro_batch_size=8"], 25),
}
# One row per kernel lever (models/kernels.py): the same engine (ZeRO-0, no recompute, micro-batch 8) with every
# lever on, then each one off. Liger needs the liger_kernel wheel on the workers' PYTHONPATH (docs/PERFORMANCE.md);
# without it `levers_on` fails at build with a message naming the fix, and the other rows still run.
_LEVER_ENGINE = ["deepspeed.zero_stage=0", "model.gradient_checkpointing=false", "train.micro_batch_size=8"]
_LEVERS_ON = ["model.vision_varlen=true", "model.fused_ce=true", "model.liger=true"]
SETTINGS.update({
    "levers_on": (_LEVER_ENGINE + _LEVERS_ON, 15),
    "varlen_off": (_LEVER_ENGINE + _LEVERS_ON + ["model.vision_varlen=false"], 15),
    "fused_ce_off": (_LEVER_ENGINE + _LEVERS_ON + ["model.fused_ce=false"], 15),
    "liger_off": (_LEVER_ENGINE + _LEVERS_ON + ["model.liger=false"], 15),
    # the attention kernels (model.vision_attention, model.sdpa_kernel; levers_on takes both as auto = grouped vision
    # attention, flash SDPA), each pinned: levers_cudnn is levers_on as it ran before these switches existed
    "levers_cudnn": (_LEVER_ENGINE + _LEVERS_ON + ["model.vision_attention=grouped", "model.sdpa_kernel=cudnn"], 15),
    "levers_flash": (_LEVER_ENGINE + _LEVERS_ON + ["model.vision_attention=grouped", "model.sdpa_kernel=flash"], 15),
    "levers_varlen": (_LEVER_ENGINE + _LEVERS_ON + ["model.vision_attention=varlen", "model.sdpa_kernel=flash"], 15),
    # QLoRA (issue 14) at the levers_on engine and batch: the pair levers_on / qlora_levers_on is bf16 vs NF4
    "qlora_levers_on": (_LEVER_ENGINE + _LEVERS_ON + ["model.quantization=nf4"], 15),
    # train/ds_fixes.py off (SETTING_ENV): DeepSpeed's own per-tensor overflow check, a host sync per gradient
    "levers_flash_ds_unfixed": (_LEVER_ENGINE + _LEVERS_ON + ["model.vision_attention=grouped",
                                                             "model.sdpa_kernel=flash"], 15),
    # the seed-like settings with every parameter persistent under ZeRO-3 (gathered once, never released)
    "seed_like_persist": (SETTINGS["seed_like"][0] + ["deepspeed.param_persistence_threshold=1e10"], 30),
    # the seed-like settings with DeepSpeed's per-module gathering (seed_like gathers whole layers)
    "seed_like_per_module": (SETTINGS["seed_like"][0] + ["deepspeed.zero3_leaf_layers=false"], 20),
    # the recipe with torch.compile of the vision layers' MLP and layer norms (model.compile_vision; the first steps
    # compile, outside the measured window)
    "recommended_compiled": (SETTINGS["recommended"][0] + ["model.compile_vision=true"], 30),
    # the seed-like settings with compiled vision layers, and with DeepSpeed's own linear (memory_efficient_linear:
    # auto turns it off when every layer is recomputed, as here)
    "seed_like_compiled": (SETTINGS["seed_like"][0] + ["model.compile_vision=true"], 30),
    "seed_like_mel": (SETTINGS["seed_like"][0] + ["deepspeed.memory_efficient_linear=true"], 30),
    # the recipe with its micro-batches left in pageable memory (train.pin_memory: the copies to the GPU staged by
    # the host inside the step), and at micro-batch 12 with the recipe's engine kept (auto would recompute there)
    "recommended_unpinned": (SETTINGS["recommended"][0] + ["model.compile_vision=true", "train.pin_memory=false"], 30),
    # the recipe with its packed crops in chunks of the checkpoint's vision_batch_size (16), as before
    # model.vision_chunk_crops existed (now all crops of a batch go through the tower in one call)
    "recommended_chunked": (SETTINGS["recommended"][0] + ["model.compile_vision=true", "model.vision_chunk_crops=16"],
                            30),
    "recommended_mb12": (SETTINGS["recommended"][0] + ["model.compile_vision=true", "train.micro_batch_size=12",
                                                       "deepspeed.zero_stage=0", "model.gradient_checkpointing=false"],
                         25),

})
# extra environment of a setting's `train` command
SETTING_ENV = {"levers_flash_ds_unfixed": {"RAYTUNE_MINICPMV_DS_FIXES": "0"}}


def base_config(work: Path, use_gpu: bool, family: str = "minicpmv2_6") -> dict:
    # absolute: the CLI reads the config's paths relative to the config file, which lives in WORK itself
    work = Path(work).resolve()
    cfg = {
        "run": {"name": "bench", "storage_path": str(work / "runs")},
        "ray": {"include_dashboard": False},
        "data": {"train_path": str(work / "data" / "train.json"), "eval_path": str(work / "data" / "eval.json"),
                 "output_path": str(work / "rows"),
                 "model_max_length": 2048, "max_slice_nums": 9, "num_cpus_per_task": 1},
        "model": {"family": "minicpmv2_6", "path": str(work / "model"), "dtype": "bf16" if use_gpu else "fp32"},
        "trainable": {"llm": "lora", "vision": "full", "resampler": "full", "embed_tokens": "frozen"},
        "lora": {"r": 64, "alpha": 64, "dropout": 0.05,
                 "target_modules": r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj)"},
        "optim": {"lr": 1e-5, "warmup_steps": 0},
        "train": {"logging_steps": 5, "eval_steps": 10**6, "eval_max_batches": 1, "save_steps": 10**6,
                  "save_total_limit": 1, "report_to": []},
        "scaling": {"num_workers": 1, "use_gpu": use_gpu, "cpus_per_worker": 12 if use_gpu else 1},
    }
    if family != "minicpmv2_6":  # 4.6: the same trainable set in its layout (merger = the resampler's role)
        cfg["model"]["family"] = family
        cfg["data"]["model_max_length"] = 4096
        cfg["lora"]["target_modules"] = (r"model\.language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj)"
                                         r"|linear_attn\.(in_proj_qkv|in_proj_z))")
    return cfg


def cli(args: list[str], env: dict, log_path: Path, timeout: float) -> tuple[int, list[tuple[float, str]], float]:
    """Run `python -m raytune_minicpmv.cli ARGS`; return (rc, [(arrival time, line)], wall s). Output is teed."""
    return run_teed([sys.executable, "-m", "raytune_minicpmv.cli", *args], env, log_path, timeout)


def run_teed(cmd: list[str], env: dict, log_path: Path, timeout: float) -> tuple[int, list[tuple[float, str]], float]:
    """Run CMD, stamping each output line on arrival and writing it to LOG_PATH at once (line-buffered: a run the
    outer `timeout` kills keeps its log); killed after TIMEOUT seconds even while it prints nothing."""
    t0 = time.monotonic()
    lines = []
    with open(log_path, "w", buffering=1) as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=str(REPO))
        killer = threading.Timer(max(timeout, 0.0), proc.kill)
        killer.start()
        try:
            for line in proc.stdout:  # line-buffered by PYTHONUNBUFFERED: stamped on arrival
                lines.append((time.monotonic(), line))
                log.write(line)
            rc = proc.wait()
        finally:
            killer.cancel()
    return rc, lines, time.monotonic() - t0


def measure(name: str, lines, wall_s: float, metrics: list[dict], steps: int, skip: int) -> dict:
    """The driver-side numbers of one run (see the module docstring)."""
    stamps = {}
    for t, line in lines:
        m = LINE.search(line)
        if m:
            stamps.setdefault(int(m.group(1)), t)
    by_step = {int(m["step"]): m for m in metrics}
    # the last report (max_steps) is printed after the final evaluation: it closes no training window
    marks = sorted(s for s in stamps if skip <= s < steps and s in by_step)
    if len(marks) < 2:
        return {"setting": name, "error": f"only {len(marks)} progress lines after step {skip}"}
    first, last = marks[0], marks[-1]
    window = [by_step[s] for s in marks[1:]]
    n_steps = last - first
    dt = stamps[last] - stamps[first]
    own = [m["step_time_s"] for m in window]
    # each report's rates cover the steps since the previous report: worker seconds of that window
    per_window = [m["step_time_s"] * (b - a) for m, a, b in zip(window, marks[:-1], marks[1:])]
    flops = sum(m["tflops_per_gpu"] * 1e12 * w for m, w in zip(window, per_window))
    samples = sum(m["samples_per_s"] * w for m, w in zip(window, per_window))
    tokens = sum(m["tokens_per_s"] * w for m, w in zip(window, per_window))
    trained = by_step[last]["tokens_seen"] - by_step[first]["tokens_seen"]
    return {"setting": name, "steps": steps, "window": [first, last], "wall_s_per_step": dt / n_steps,
            "own_step_s": sum(own) / len(own), "samples_per_s": samples / dt, "tokens_per_s": tokens / dt,
            "trained_tokens_per_s": trained / dt, "mfu": flops / dt / PEAK,
            "peak_gpu_mem_gib": max(m.get("peak_gpu_mem_gib", 0.0) for m in window),
            "peak_gpu_reserved_gib": max(m.get("peak_gpu_reserved_gib", 0.0) for m in window),
            "data_wait_frac": sum(m["data_wait_frac"] for m in window) / len(window),
            "fit_wall_s": wall_s, "fixed_s": wall_s - steps * dt / n_steps,
            "engine": _engine_line(lines)}


def _engine_line(lines) -> str:
    for _, line in lines:
        if "engine choice:" in line:
            choice = line.split("engine choice:", 1)[1].split("(budget")[0].strip()
            return choice.replace("gradient_checkpointing=", "ckpt=")
    return ""


def _drop_checkpoints(run_dir: Path) -> None:
    import shutil

    for d in run_dir.glob("checkpoint_*"):
        shutil.rmtree(d, ignore_errors=True)


def read_metrics(work: Path, run: str) -> list[dict]:
    path = work / "runs" / run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def table(rows: list[dict]) -> str:
    head = (f"{'setting':<17}{'engine':<26}{'wall s/step':>12}{'own s':>7}{'samples/s':>10}{'tok/s':>8}"
            f"{'trained/s':>10}{'MFU':>7}{'peak GiB':>9}{'wait':>6}{'fixed s':>8}")
    out = [head]
    for r in rows:
        if "error" in r:
            out.append(f"{r['setting']:<17}ERROR {r['error'][:100]}")
            continue
        if "wall_s_per_step" not in r:  # a profiled run: its summary
            out.append(f"{r['setting']:<17}" + (r.get("profile") or "no profile summary").strip())
            continue
        out.append(f"{r['setting']:<17}{r['engine'][:25]:<26}{r['wall_s_per_step']:>12.3f}{r['own_step_s']:>7.3f}"
                   f"{r['samples_per_s']:>10.2f}{r['tokens_per_s']:>8.0f}{r['trained_tokens_per_s']:>10.0f}"
                   f"{100 * r['mfu']:>6.1f}%{r['peak_gpu_mem_gib']:>9.1f}{100 * r['data_wait_frac']:>5.0f}%"
                   f"{r['fixed_s']:>8.0f}")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/bench")
    p.add_argument("--out", default="real_path.jsonl")
    p.add_argument("--logs", default=None, help="folder for each command's full log (default: <work>/logs)")
    p.add_argument("--settings", default="seed_like,recommended,zero2_ckpt_mb2,zero2_mb8")
    p.add_argument("--profile", default=None, help="a setting to run once more with `train --profile`")
    p.add_argument("--records", type=int, default=320)
    p.add_argument("--skip", type=int, default=5, help="measure from the first report at or after this step")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new run after this many seconds")
    p.add_argument("--deadline-s", type=float, default=1e9, help="kill a run still going after this many seconds")
    p.add_argument("--tokenizer", default=str(REPO / "tests" / "assets" / "minicpmv26_tokenizer"))
    p.add_argument("--cpu", action="store_true", help="CPU smoke run (tiny model, tiny steps)")
    p.add_argument("--family", default="minicpmv2_6", choices=["minicpmv2_6", "minicpmv4_6"],
                   help="minicpmv4_6: the 4.6-dims model (workload.build_model_v46); use its own --work folder")
    a = p.parse_args(argv)
    t_start = time.monotonic()
    work = Path(a.work).resolve()
    logs = Path(a.logs or work / "logs")
    logs.mkdir(parents=True, exist_ok=True)
    import workload

    workload.write_records(work / "data", a.records)
    workload.write_records(work / "data", 16, seed=1, split="eval")
    if a.cpu:
        from raytune_minicpmv.models import build_tiny
        from raytune_minicpmv.models.tiny_v4 import build_tiny_v4

        if not (work / "model" / "config.json").exists():
            if a.family == "minicpmv2_6":
                build_tiny("minicpmv2_6", work / "model", tokenizer=a.tokenizer)
            else:
                build_tiny_v4(a.family, work / "model")
    elif a.family == "minicpmv4_6":
        workload.build_model_v46(work / "model")
    else:
        workload.build_model(work / "model", a.tokenizer)
    print(f"workload ready in {time.monotonic() - t_start:.0f} s", flush=True)
    cfg_path = work / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(base_config(work, not a.cpu, a.family)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if not (work / "rows" / "report.json").exists():
        rc, _, s = cli(["preprocess", "--config", str(cfg_path)], env, logs / "preprocess.log", 900)
        print(f"preprocess rc={rc} in {s:.0f} s", flush=True)
        if rc:
            sys.exit(rc)
    runs = [(n, *SETTINGS[n]) for n in a.settings.split(",") if n]
    if a.profile:  # first: with --budget-s the diagnosis is what a short call must not lose
        runs.insert(0, (f"{a.profile}+profile", SETTINGS[a.profile][0] + ["train.profile_steps=5"], 10))
    rows = []
    for name, overrides, steps in runs:
        if a.cpu:
            steps = 6
        if time.monotonic() - t_start > a.budget_s:
            rows.append({"setting": name, "error": "skipped: over --budget-s"})
            continue
        run = f"{name.replace('+', '_')}-{int(time.time())}"
        args = ["train", "--config", str(cfg_path), f"run.name={run}", "data.preprocessed=true",
                f"train.max_steps={steps}", *overrides] + (["train.logging_steps=2"] if a.cpu else [])
        left = min(560.0, a.deadline_s - (time.monotonic() - t_start))
        rc, lines, wall = cli(args, {**env, **SETTING_ENV.get(name.split("+")[0], {})}, logs / f"{name.replace('+', '_')}.log", left)
        # a failure after the measured window (final eval / save) still leaves its numbers: keep both
        row = measure(name, lines, wall, read_metrics(work, run), steps, 2 if a.cpu else a.skip)
        if rc != 0:
            row["rc"] = rc
            row["error" if "error" in row else "failed_after"] = f"rc={rc}: " + "".join(
                x for _, x in lines[-8:])[-400:]
        if name.endswith("+profile"):  # a profiled run is not timed (the profiler's own overhead): its summary
            at = next((i for i, (_, x) in enumerate(lines) if "profile of" in x), len(lines))
            row = {"setting": name, "profile": "".join(x for _, x in lines[at:at + 100])}
        _drop_checkpoints(work / "runs" / run)  # a full fine-tune's checkpoint is ~35 GB: keep the disk free
        rows.append(row)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(table([row]), flush=True)
    print("\n" + table(rows), flush=True)


if __name__ == "__main__":
    main()
