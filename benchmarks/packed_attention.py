"""Which attention runs packed rows fastest: the LLM of the issue-12 workload (Qwen2-1.5B dims, 28 layers, GQA
12/2 heads, 151,666 vocab, random bf16 weights), forward + backward of the summed CE, on the same samples as

* `padded_sdpa`: a padded batch (B samples × the longest; plain causal SDPA: transformers' is_causal path when
  the positions are 0..L-1 on every row, pad positions included);
* `packed_sdpa`: one packed row, positions restarting (transformers' block-diagonal bool mask through SDPA);
* `packed_flex`: the same row, FlexAttention with transformers' document BlockMask (compiled);
* `packed_varlen`: the same row, torch varlen_attn (K/V repeated to the query heads), models/packing.py.

    python benchmarks/packed_attention.py [--samples 12] [--reps 10] [--out packed_attention.jsonl]

Sample lengths are seed-shaped (uniform 400-950, mean ≈ 675 tokens; deterministic). Times are CUDA-event
medians after 3 warm-up steps; one row per variant with ms/step, real tokens/s and peak memory. Runs in about a
minute on an H200 (no Ray, no DeepSpeed: the kernel choice only, the real path is benchmarks/real_path.py).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_llm(layers: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=1536, num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=2,
                      intermediate_size=8960, vocab_size=151_666, max_position_embeddings=32768)
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    return model


class Wrap(torch.nn.Module):
    """What models.packing.use_packed_attention expects: a model with `.llm`."""

    def __init__(self, llm):
        super().__init__()
        self.llm = llm


def batches(n: int, seed: int = 0):
    rng = random.Random(seed)
    lens = [rng.randint(400, 950) for _ in range(n)]
    ids = [torch.randint(0, 151_666, (k,), generator=torch.Generator().manual_seed(i)) for i, k in enumerate(lens)]
    width = max(lens)
    pad_ids = torch.zeros(n, width, dtype=torch.long)
    pad_labels = torch.full((n, width), -100)
    for i, x in enumerate(ids):
        pad_ids[i, :len(x)] = x
        pad_labels[i, :len(x) - 1] = x[1:]
    padded = {"input_ids": pad_ids, "labels": pad_labels, "position_ids": torch.arange(width).repeat(n, 1)}
    row_ids = torch.cat(ids)[None]
    row_labels = torch.cat([torch.cat([x[1:], torch.tensor([-100])]) for x in ids])[None]
    lens_t = torch.tensor(lens)
    packed = {"input_ids": row_ids, "labels": row_labels,
              "position_ids": torch.cat([torch.arange(k) for k in lens])[None],
              "cu_seq_lens": torch.cat([torch.zeros(1, dtype=torch.long), lens_t.cumsum(0)]).int(),
              "max_seq_len": max(lens)}
    return lens, padded, packed


def step(llm, b: dict) -> None:
    from raytune_minicpmv.models.loss import compute_loss
    from raytune_minicpmv.models.packing import packed_llm_kwargs

    out = llm(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False, **packed_llm_kwargs(b))
    loss, _ = compute_loss(out.logits, b["labels"])
    loss.backward()


def timed(llm, b: dict, reps: int) -> tuple[float, float]:
    b = {k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()}
    for _ in range(3):
        step(llm, b)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(llm, b)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    llm.zero_grad(set_to_none=True)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def main(argv=None) -> None:
    from raytune_minicpmv.models.packing import use_packed_attention

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=12)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--variants", default="padded_sdpa,packed_sdpa,packed_flex,packed_varlen")
    p.add_argument("--out", default="packed_attention.jsonl")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    llm = build_llm(a.layers)
    lens, padded, packed = batches(a.samples)
    real = sum(lens)
    print(f"{a.samples} samples, {real} real tokens; padded {padded['input_ids'].numel()} tokens "
          f"({100 * (1 - real / padded['input_ids'].numel()):.0f} % padding); torch {torch.__version__}", flush=True)
    rows = []
    for name in a.variants.split(","):
        use_packed_attention(Wrap(llm), name.split("_", 1)[1] if name.startswith("packed_") else "sdpa")
        try:
            ms, peak = timed(llm, padded if name == "padded_sdpa" else packed, a.reps)
            row = {"variant": name, "ms_per_step": round(ms, 2), "real_tokens_per_s": round(real / ms * 1e3),
                   "peak_gib": round(peak, 2)}
        except Exception as e:  # noqa: BLE001 - one failing backend still leaves the others' rows
            row = {"variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
