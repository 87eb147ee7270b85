"""Random-weight checkpoints in the real layout, for tests, the demo and GPU benchmarks (no downloads).

    from raytune_minicpmv.models import build_tiny
    ckpt = build_tiny("minicpmv2_6", "/tmp/tiny")                       # seconds on CPU, ~1.5 MB
    ckpt = build_tiny("minicpmv2_6", "/tmp/bench", vision="real", llm_hidden=1536, llm_layers=28,
                      dtype=torch.bfloat16)                             # 2.6 vision + resampler dims, smaller LLM

The directory holds `config.json` (flat, like a real one, our model_type), `model.safetensors` (sharded above
`max_shard_size`), tokenizer files from `tiny_tokenizer.build_tiny_tokenizer` (or copied from `tokenizer=<dir>`),
`preprocessor_config.json` and `generation_config.json`; `load_model(ckpt)` loads it like a real checkpoint.

Size arguments (None = the preset's value): `vision` "tiny" (hidden 64, 2 layers, 2 heads, mlp 128) or "real"
(SigLIP-so400m: 1152, 27 layers, 16 heads, 4304); `llm` "tiny" (hidden 128, 2 layers) or "real" (the family's
LLM: Qwen2-7B / Llama3-8B dims); `llm_hidden`, `llm_layers`, `llm_heads` (default hidden/64, or hidden/128 from
1024 up), `llm_kv_heads` (default a divisor of heads near heads/4), `llm_intermediate` (default 4 x hidden);
`vision_hidden`, `vision_layers`, `vision_heads`, `vision_intermediate`; `query_num` (family default: 64, 2.5: 96);
`vocab_size` (default: the tokenizer's length; larger pads the embedding like real checkpoints);
`max_slice_nums` (9), `vision_batch_size` (16), `seed` (0), `dtype` (float32), `max_shard_size` ("2GB").
Resampler heads are `llm_hidden // 128`, so keep `llm_hidden >= 128`.

4.6 / 4.7 (`minicpmv4_6`, `minicpmv4_7`): see tiny_v4.py (transformers' config classes; tokenizer + processor
files from `tiny_processor4`, or the 4.x tokenizer in `tokenizer`); `vocab_size`, `max_slice_nums`, `seed`, `dtype`
and `max_shard_size` apply.

`layout="published"` (2.6, 2.5) writes the folder users download instead (models/published.py): the real
config.json/tokenizer_config.json/preprocessor files with only the sizes shrunk; then only the size arguments,
`tokenizer`, `seed` and `dtype` (float32 means "the default", bf16) apply.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from .registry import FAMILIES, get_family

TINY_VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
REAL_VISION = dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304)
TINY_LLM = dict(hidden=128, layers=2)
REAL_LLM = {
    "minicpmv2_6": dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944),
    "minicpmv2_5": dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336),
}
# Fields of the real flat configs that are not sizes.
LLM_EXTRAS = {
    "minicpmv2_6": dict(hidden_act="silu", rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                        tie_word_embeddings=False, use_sliding_window=False, sliding_window=131072,
                        max_window_layers=28, attention_dropout=0.0, initializer_range=0.02),
    "minicpmv2_5": dict(hidden_act="silu", rope_theta=5e5, rms_norm_eps=1e-5, max_position_embeddings=8192,
                        tie_word_embeddings=False, attention_bias=False, attention_dropout=0.0,
                        initializer_range=0.02),
}


def build_tiny(family: str, out_dir, *, vision: str = "tiny", llm: str = "tiny",
               llm_hidden: Optional[int] = None, llm_layers: Optional[int] = None, llm_heads: Optional[int] = None,
               llm_kv_heads: Optional[int] = None, llm_intermediate: Optional[int] = None,
               vision_hidden: Optional[int] = None, vision_layers: Optional[int] = None,
               vision_heads: Optional[int] = None, vision_intermediate: Optional[int] = None,
               query_num: Optional[int] = None, vocab_size: Optional[int] = None, max_slice_nums: int = 9,
               vision_batch_size: int = 16, tokenizer: Optional[str] = None, seed: int = 0,
               dtype: torch.dtype = torch.float32, max_shard_size: str = "2GB", layout: str = "native") -> Path:
    """Write a complete random-weight checkpoint directory for `family` and return its path.

    `layout="published"`: the users' layout instead (real config.json with only sizes shrunk, original tokenizer
    config, sharded bf16 weights, remote-code placeholders): see `published.build_published`."""
    if get_family(family).hf_native:  # 4.6 / 4.7: transformers' config classes (tiny_v4.py)
        from .tiny_v4 import build_tiny_v4

        return build_tiny_v4(family, out_dir, tokenizer=tokenizer, seed=seed, dtype=dtype, vocab_size=vocab_size,
                             max_slice_nums=max_slice_nums, max_shard_size=max_shard_size)
    if layout == "published":
        return _build_published(family, out_dir, locals())
    if layout != "native":
        raise ValueError(f"layout={layout!r}: expected 'native' or 'published'")
    fam = get_family(family)
    fam.check_supported()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _write_tokenizer(out, fam.llm_type, tokenizer)

    config = fam.config_class(**_config_fields(fam.name, vision, llm, locals(), len(tok)),
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if config.hidden_size < 128:
        raise ValueError(f"llm_hidden={config.hidden_size}: must be >= 128 (resampler heads = hidden // 128)")
    torch.manual_seed(seed)
    with _default_dtype(dtype):
        model = fam.model_class(config)
    model.to(dtype)
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    _write_side_files(out, fam, config, tok)
    return out


def _build_published(family: str, out_dir, args: dict) -> Path:
    from .published import SIZES, build_published

    fixed = {"vision": "tiny", "llm": "tiny", "query_num": None, "vocab_size": None, "max_slice_nums": 9,
             "vision_batch_size": 16, "max_shard_size": "2GB"}
    changed = [k for k, v in fixed.items() if args[k] != v]
    if changed:
        raise ValueError(f"build_tiny(layout='published'): {', '.join(changed)} cannot be set (the published "
                         "layout keeps the real config.json's values; only the sizes in published.SIZES shrink)")
    dtype = torch.bfloat16 if args["dtype"] == torch.float32 else args["dtype"]  # the real weights are bf16
    return build_published(family, out_dir, tokenizer=args["tokenizer"], seed=args["seed"], dtype=dtype,
                           **{k: args[k] for k in SIZES})


def _config_fields(family: str, vision: str, llm: str, args: dict, tokenizer_len: int) -> dict:
    if vision not in ("tiny", "real") or llm not in ("tiny", "real"):
        raise ValueError(f"vision={vision!r}, llm={llm!r}: each must be 'tiny' or 'real'")
    v = dict(REAL_VISION if vision == "real" else TINY_VISION)
    for key, arg in (("hidden_size", "vision_hidden"), ("num_hidden_layers", "vision_layers"),
                     ("num_attention_heads", "vision_heads"), ("intermediate_size", "vision_intermediate")):
        if args[arg] is not None:
            v[key] = args[arg]
    preset = dict(REAL_LLM[family] if llm == "real" else TINY_LLM)
    if args["llm_hidden"] is not None:  # a new width: the preset's heads/intermediate no longer fit
        preset = {"hidden": args["llm_hidden"], "layers": preset["layers"]}
    hidden = preset["hidden"]
    heads = args["llm_heads"] or preset.get("heads") or max(1, hidden // (128 if hidden >= 1024 else 64))
    kv = args["llm_kv_heads"] or preset.get("kv_heads") or \
        next(d for d in range(max(1, heads // 4), 0, -1) if heads % d == 0)
    intermediate = args["llm_intermediate"] or preset.get("intermediate") or 4 * hidden
    vocab = max(args["vocab_size"] or 0, tokenizer_len)
    return dict(
        LLM_EXTRAS[family], hidden_size=hidden, num_hidden_layers=args["llm_layers"] or preset["layers"],
        num_attention_heads=heads, num_key_value_heads=kv,
        intermediate_size=intermediate,
        vocab_size=vocab, query_num=args["query_num"], drop_vision_last_layer=False,
        slice_config={"patch_size": 14, "max_slice_nums": args["max_slice_nums"], "scale_resolution": 448},
        vision_config=dict(v, image_size=980, patch_size=14,
                           model_type="idefics2" if family == "minicpmv2_5" else "siglip"),
        vision_batch_size=args["vision_batch_size"], version=FAMILIES[family].version,
        use_image_id=family != "minicpmv2_5", batch_vision_input=True)


def _write_tokenizer(out: Path, llm_type: str, tokenizer: Optional[str]):
    from transformers import AutoTokenizer

    if tokenizer is None:
        from raytune_minicpmv.models.tiny_tokenizer import build_tiny_tokenizer

        build_tiny_tokenizer(out, llm_type)
    else:
        for f in Path(tokenizer).iterdir():
            if f.is_file() and ("token" in f.name or f.name in ("vocab.json", "merges.txt")):
                shutil.copy2(f, out / f.name)
    return AutoTokenizer.from_pretrained(str(out))


def _write_side_files(out: Path, fam, config, tok) -> None:
    pre = {"image_processor_type": "MiniCPMVImageProcessor", "processor_class": "MiniCPMVProcessor",
           "max_slice_nums": config.slice_config["max_slice_nums"],
           "scale_resolution": config.slice_config["scale_resolution"], "patch_size": config.patch_size,
           "image_feature_size": config.query_num, "im_start": "<image>", "im_end": "</image>",
           "slice_start": "<slice>", "slice_end": "</slice>", "unk": "<unk>",
           "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5], "slice_mode": True, "version": fam.version}
    if config.use_image_id:
        pre.update(use_image_id=True, im_id_start="<image_id>", im_id_end="</image_id>")
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # Build big "real" models directly in bf16 so a 7B LLM never needs fp32 host memory.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else old)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
