"""A small, deterministic sample dataset in the MiniCPM-V fine-tune format (for tests and the demo).

    from raytune_minicpmv.data.sample_data import write_sample_dataset
    train_json = write_sample_dataset("/tmp/sample")                 # /tmp/sample/train.json + images/
    eval_json = write_sample_dataset("/tmp/sample", split="eval")    # /tmp/sample/eval.json (other records)

What it writes: a JSON array of records (`id`, `image`, `conversations`, optional `system`) and PNG/JPEG images
drawn with PIL from a seeded RNG, so two runs give identical files. Image paths are relative to the JSON file's
directory (the reader resolves them). The mix covers every record shape the pipeline supports: one image with and
without an explicit `<image>` tag, several images with `<image_NN>` tags (also in a later turn), multi-turn chats,
a `system` prompt and text-only records. Most images are at most 448x448 (one crop, so the tiny model stays
fast); a few larger ones exercise slicing (2-4 slices each), which keeps the total crop count modest.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40),
           "orange": (245, 140, 30), "purple": (140, 60, 180), "black": (10, 10, 10), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "rectangle")

# (width, height) per image slot; the larger ones slice: 640x480 -> 2 crops + source, 900x600 -> 3, 1000x300 -> 3.
_SMALL = [(448, 448), (320, 240), (224, 224), (400, 300), (256, 384), (120, 90), (448, 336), (300, 300)]
_LARGE = [(640, 480), (900, 600), (1000, 300)]

SPLITS = {"train": (20, 0), "eval": (6, 1000)}  # records, seed offset


def write_sample_dataset(out_dir, split: str = "train", num_records: int | None = None) -> Path:
    """Write `<out_dir>/<split>.json` (+ images under `<out_dir>/images/`) and return the JSON path."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    n, seed = SPLITS[split]
    n = num_records or n
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234 + seed)
    records = [_make_record(out, split, i, rng) for i in range(n)]
    path = out / f"{split}.json"
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    return path


def _make_record(out: Path, split: str, i: int, rng: random.Random) -> dict:
    # Record kinds in a fixed rotation so every split has each kind.
    kind = ("single_tag", "single_notag", "multi", "multiturn", "text", "single_system", "single_tag",
            "multi_later")[i % 8]
    rid = f"{split}-{i:03d}"
    large = i % 7 == 3  # a few records use a sliced (larger) image
    if kind == "text":
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        return {"id": rid, "conversations": [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"The answer is {a + b}."}]}
    if kind in ("multi", "multi_later"):
        names, facts = [], []
        for k in range(2):
            name, fact = _draw_image(out, f"{rid}_{k}", _pick_size(rng, large and k == 0), rng, jpeg=k == 1)
            names.append(name)
            facts.append(fact)
        images = {f"<image_{k:02d}>": names[k] for k in range(2)}
        if kind == "multi":
            conv = [{"role": "user", "content": "<image_00>\n<image_01>\nCompare the two images."},
                    {"role": "assistant", "content": f"The first shows {facts[0]}; the second shows {facts[1]}."}]
        else:  # the second image is introduced in a later user turn
            conv = [{"role": "user", "content": "<image_00>\nWhat is in the picture?"},
                    {"role": "assistant", "content": f"It shows {facts[0]}."},
                    {"role": "user", "content": "And in this one? <image_01>"},
                    {"role": "assistant", "content": f"This one shows {facts[1]}."}]
        return {"id": rid, "image": images, "conversations": conv}
    name, fact = _draw_image(out, rid, _pick_size(rng, large), rng, jpeg=i % 3 == 0)
    rec = {"id": rid, "image": name}
    if kind == "single_notag":
        conv = [{"role": "user", "content": "Describe the image."},
                {"role": "assistant", "content": f"The picture shows {fact}."}]
    elif kind == "multiturn":
        conv = [{"role": "user", "content": "<image>\nWhat is in the picture?"},
                {"role": "assistant", "content": f"There is {fact}."},
                {"role": "user", "content": "Is it on a white background?"},
                {"role": "assistant", "content": "Yes, the background is white."}]
    else:
        conv = [{"role": "user", "content": "<image>\nWhat shape is shown?"},
                {"role": "assistant", "content": f"It is {fact}."}]
    if kind == "single_system":
        rec["system"] = "Please answer briefly."
    rec["conversations"] = conv
    return rec


def _pick_size(rng: random.Random, large: bool) -> tuple[int, int]:
    return rng.choice(_LARGE if large else _SMALL)


def _draw_image(out: Path, stem: str, size: tuple[int, int], rng: random.Random, jpeg: bool) -> tuple[str, str]:
    """Draw one coloured shape (plus a little clutter) on white; return (relative path, description)."""
    w, h = size
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for _ in range(6):  # faint clutter so crops are not constant
        x, y = rng.randrange(w), rng.randrange(h)
        draw.line([(x, y), (rng.randrange(w), rng.randrange(h))], fill=(rng.randrange(180, 240),) * 3, width=2)
    colour = rng.choice(sorted(COLOURS))
    shape = rng.choice(SHAPES)
    cx, cy, r = w // 2, h // 2, max(4, min(w, h) // 3)
    box = [cx - r, cy - r, cx + r, cy + r]
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        draw.rectangle([cx - r, cy - r // 2, cx + r, cy + r // 2], fill=fill)
    rel = f"images/{stem}.{'jpg' if jpeg else 'png'}"
    if jpeg:
        img.save(out / rel, quality=90)
    else:
        img.save(out / rel)
    return rel, f"a {colour} {shape}"
