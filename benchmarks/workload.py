"""The issue-12 GPU workload, deterministic: a 2.21 B MiniCPM-V-2.6-shaped model and seed-shaped records.

    python benchmarks/workload.py --out /tmp/bench --tokenizer tests/assets/minicpmv26_tokenizer [--records 320]

Model (`build_model`): SigLIP-400M vision tower at its real dims (1152 hidden, 27 layers, 16 heads, 4304 MLP),
the resampler at 2.6's (64 queries), and a Qwen2-1.5B-dims LLM (1536 hidden, 28 layers, 12 heads, 2 KV heads,
8960 MLP) with the real 2.6 tokenizer (151,666 tokens), random bf16 weights, built with `models.build_tiny`.

Records (`write_records`): the shape of the seed data — one JPEG per record, 640×480 … 1344×1344 (≈ 6.8 crops
with 2.6's slicing at max_slice_nums 9), 1-3 user/assistant turns with English-like text, ≈ 660 tokens and
≈ 175 trained (assistant) tokens per sample. Images are smooth gradients with shapes and a little noise, so the
JPEGs decode like photos (not like flat colours). Same `seed` ⇒ byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL_DIMS = dict(vision="real", llm_hidden=1536, llm_layers=28, llm_heads=12, llm_kv_heads=2,
                  llm_intermediate=8960)
# (width, height, weight): the mix gives ≈ 6.8 crops per image with 2.6's slicing (1 source + up to 9 slices)
IMAGE_SIZES = [(640, 480, 2), (800, 600, 1), (1024, 768, 2), (1280, 720, 1), (1024, 1024, 2), (1344, 896, 2),
               (896, 1344, 1), (1200, 1200, 1), (1344, 1344, 3)]
WORDS = ("the a image shows left right top bottom corner object colour red green blue large small near far "
         "person car tree sky building window road sign text label background foreground light dark bright "
         "shadow two three several many each some part side middle edge line circle square shape pattern").split()


def build_model(out: Path, tokenizer: str) -> Path:
    """The 2.21 B random-weight checkpoint (built on the GPU when there is one: minutes faster than CPU init)."""
    import torch

    from raytune_minicpmv.models import build_tiny

    if (out / "config.json").exists():
        return out
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with device:
        build_tiny("minicpmv2_6", out, tokenizer=tokenizer, dtype=torch.bfloat16, max_shard_size="5GB",
                   **MODEL_DIMS)
    return out


# MiniCPM-V 4.6 at its published dims (../shared/reference/minicpmv4-facts.md): Qwen3.5-0.8B text (hidden 1024, 24
# layers, 3 of 4 Gated-DeltaNet, 8 q / 2 kv heads of 256, MLP 3584, vocab 248,320, tied head) and SigLIP2-400M
# (1152 × 27 layers, 16 heads, MLP 4304, patch 14). The linear-attention head dims are not in our sources: assumed
# 16 key/value heads of 128 (transformers' Qwen3.5 defaults use heads of 128 too).
V46_TEXT = dict(vocab_size=248320, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
                num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_key_head_dim=128,
                linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=16)
V46_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  patch_size=14)


def build_model_v46(out: Path, family: str = "minicpmv4_6") -> Path:
    """A MiniCPM-V-4.6-dims random-weight checkpoint (≈ 1.3 B) with the tiny 4.x tokenizer padded to the real
    vocabulary: the text tokenizes into more tokens than with the real one, so compare token counts, not texts.
    family="minicpmv4_7": 4.7's class (canvas M-RoPE) at the same dims (4.7-1B's own dims are not in our sources)."""
    import torch

    from raytune_minicpmv.models.tiny_v4 import build_tiny_v4

    if (out / "config.json").exists():
        return out
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with device:
        build_tiny_v4(family, out, llm_layers=24, dtype=torch.bfloat16, max_shard_size="5GB",
                      text_overrides=V46_TEXT, vision_overrides=V46_VISION)
    return out


def _sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return " ".join(words).capitalize() + "."


def _text(rng: random.Random, n_words: int) -> str:
    out, left = [], n_words
    while left > 0:
        k = min(left, rng.randint(6, 14))
        out.append(_sentence(rng, k))
        left -= k
    return " ".join(out)


def _draw(path: Path, size: tuple[int, int], rng: random.Random) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    w, h = size
    g = np.random.default_rng(rng.randrange(2**32))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([(xx / w) * 255 * g.random(), (yy / h) * 255 * g.random(),
                     ((xx + yy) / (w + h)) * 255 * g.random()], axis=-1)
    base += g.normal(0, 6, size=base.shape)  # sensor-like noise: realistic JPEG size and decode cost
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 8)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = x0 + rng.randint(20, w // 3), y0 + rng.randint(20, h // 3)
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    img.save(path, quality=88)


def write_records(out: Path, n: int, seed: int = 0, split: str = "train") -> Path:
    """`<out>/<split>.json` + `<out>/images/*.jpg`: n seed-shaped records (see the module docstring)."""
    path = out / f"{split}.json"
    if path.exists() and len(json.loads(path.read_text())) == n:
        return path
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sizes = [s[:2] for s in IMAGE_SIZES for _ in range(s[2])]
    records = []
    for i in range(n):
        name = f"images/{split}-{i:05d}.jpg"
        _draw(out / name, rng.choice(sizes), rng)
        turns = rng.choice((1, 2, 2, 3))
        answer_words = rng.randint(120, 190)  # ≈ 1.1 tokens a word: ≈ 175 trained tokens with the turn ends
        conv = []
        for t in range(turns):
            question = _text(rng, rng.randint(3, 9)).rstrip(".") + "?"
            conv.append({"role": "user", "content": ("<image>\n" if t == 0 else "") + question})
            conv.append({"role": "assistant", "content": _text(rng, max(4, answer_words // turns))})
        records.append({"id": f"{split}-{i:05d}", "image": name, "conversations": conv})
    path.write_text(json.dumps(records))
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/bench")
    p.add_argument("--tokenizer", default=str(REPO / "tests" / "assets" / "minicpmv26_tokenizer"))
    p.add_argument("--records", type=int, default=320)
    p.add_argument("--no-model", action="store_true", help="records only")
    a = p.parse_args(argv)
    out = Path(a.out)
    os.makedirs(out, exist_ok=True)
    print("records:", write_records(out / "data", a.records), write_records(out / "data", 16, 1, "eval"), flush=True)
    if not a.no_model:
        print("model:", build_model(out / "model", a.tokenizer), flush=True)


if __name__ == "__main__":
    main()
