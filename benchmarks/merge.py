"""Peak host RSS and wall time of our streaming merge vs the load-everything baseline, on a multi-GB random model.

    .venv/bin/python benchmarks/merge.py                          # ~2.4 GB bf16 Qwen2-shaped model, 5 shards
    .venv/bin/python benchmarks/merge.py --layers 4 --keep        # smaller; keep /tmp/merge_bench for a look

What it builds (under --workdir, deleted at the end unless --keep): a Qwen2ForCausalLM-shaped checkpoint (hidden 1536,
kv heads 2, mlp 8960, vocab 151936, untied lm_head; --layers decoder layers) written shard by shard from the meta
device with random bf16 data, so building it never holds the model; and a PEFT adapter as the train stage writes it:
LoRA r=64 on q/k/v/o of every layer plus a fully trained `embed_tokens` copy (`modules_to_save`).

What it runs, each in a fresh subprocess that reports its own peak RSS (VmHWM) and wall time:
  baseline   the seed's procedure: from_pretrained(bf16) + PeftModel.from_pretrained + merge_and_unload +
             save_pretrained (same max_shard_size)
  ours       raytune_minicpmv.merge.merger.merge_adapter with verify_samples=0 (the streaming merge alone)
  ours+verify merge_adapter with the default verification (2 samples; loads adapter-on-base, then the merged model)
and compares the tensors ours and the baseline wrote. Goal: ours ≤ 1.5 × (largest base shard + adapter).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

GiB = 2**30


def build_base(path: Path, layers: int, shard_bytes: int) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=layers,
                      num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Qwen2ForCausalLM(cfg).state_dict().items()}
    path.mkdir(parents=True)
    groups, size = [[]], 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.randn(shapes[k], generator=g) * 0.02).to(torch.bfloat16) for k in keys}
        save_file(tensors, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
    total = sum(math.prod(s) * 2 for s in shapes.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    cfg.save_pretrained(path)


def build_adapter(path: Path, base: Path, layers: int, r: int = 64) -> None:
    import torch
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import save_file

    LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
               modules_to_save=["embed_tokens"], task_type="CAUSAL_LM").save_pretrained(path)
    g = torch.Generator().manual_seed(1)
    dims = {"q_proj": (1536, 1536), "k_proj": (256, 1536), "v_proj": (256, 1536), "o_proj": (1536, 1536)}
    tensors = {}
    for i in range(layers):
        for proj, (out_f, in_f) in dims.items():
            pre = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{pre}.lora_A.weight"] = (torch.randn(r, in_f, generator=g) * 0.01).to(torch.bfloat16)
            tensors[f"{pre}.lora_B.weight"] = (torch.randn(out_f, r, generator=g) * 0.01).to(torch.bfloat16)
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(base / index["model.embed_tokens.weight"]), "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    tensors["base_model.model.model.embed_tokens.weight"] = embed + 0.01  # the "trained" copy
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------------------------
# The measured runs (each in its own process: `python benchmarks/merge.py --child MODE base adapter out`)


def child(mode: str, base: str, adapter: str, out: str) -> None:
    t0 = time.time()
    if mode == "baseline":
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(out, max_shard_size="2GB")
    else:
        from raytune_minicpmv.config import MergeConfig
        from raytune_minicpmv.merge.merger import merge_adapter

        merge_adapter(base, adapter, out, MergeConfig(dtype="bf16", verify_samples=0 if mode == "ours" else 2))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would inherit the parent's peak.
    status = Path("/proc/self/status").read_text()
    peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024
    print(json.dumps({"mode": mode, "seconds": time.time() - t0, "peak_rss": peak}))


def measure(mode: str, base: Path, adapter: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(base), str(adapter), str(out)],
                          capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_abs_diff(a: Path, b: Path) -> float:
    """Largest |ours - baseline| over all tensors. Not 0 in bf16: PEFT adds a bf16-rounded delta to the bf16 weight
    (two roundings); we add the fp32 delta to the fp32 weight and round once."""
    from raytune_minicpmv.merge.safetensors_stream import CheckpointReader

    ra, rb = CheckpointReader(a), CheckpointReader(b)
    if set(ra.keys()) != set(rb.keys()):
        raise AssertionError(f"different tensor names: {sorted(set(ra.keys()) ^ set(rb.keys()))[:5]}")
    return max((ra.get(k).float() - rb.get(k).float()).abs().max().item() for k in ra.keys())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/merge_bench")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--shard-mb", type=int, default=550)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--child", nargs=4, metavar=("MODE", "BASE", "ADAPTER", "OUT"))
    args = p.parse_args()
    if args.child:
        return child(*args.child)

    import peft
    import torch
    import transformers

    from raytune_minicpmv.merge.safetensors_stream import CheckpointReader

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    base, adapter = work / "base", work / "adapter"
    t0 = time.time()
    build_base(base, args.layers, args.shard_mb * 10**6)
    build_adapter(adapter, base, args.layers)
    reader = CheckpointReader(base)
    largest, model_bytes = reader.largest_file_bytes, reader.total_bytes
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    print(f"built in {time.time() - t0:.0f} s: base {model_bytes / GiB:.2f} GiB in {len(reader.weight_files)} "
          f"shards (largest {largest / GiB:.2f} GiB), adapter {adapter_bytes / GiB:.2f} GiB")

    results = [measure(mode, base, adapter, work / f"out_{mode}") for mode in ("baseline", "ours", "ours+verify")]
    diff = max_abs_diff(work / "out_baseline", work / "out_ours")
    goal = 1.5 * (largest + adapter_bytes)
    print(f"\ntorch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"{os.cpu_count()} CPUs\n")
    print("| run | peak RSS (GiB) | × (largest shard + adapter) | wall (s) |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['peak_rss'] / GiB:.2f} | {r['peak_rss'] / (largest + adapter_bytes):.2f} "
              f"| {r['seconds']:.1f} |")
    ours = next(r for r in results if r["mode"] == "ours")
    print(f"\nmax |ours - baseline| over all merged tensors: {diff:.3g} (bf16 rounding); goal ours ≤ {goal / GiB:.2f} GiB: "
          f"{'met' if ours['peak_rss'] <= goal else 'MISSED'}")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
