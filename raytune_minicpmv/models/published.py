"""Tiny random-weight checkpoints in the PUBLISHED layout: a folder like a downloaded `openbmb/MiniCPM-V-2_6`.

    from raytune_minicpmv.models import build_tiny
    ckpt = build_tiny("minicpmv2_6", "/tmp/pub", layout="published")     # ~80 MB bf16, seconds on CPU
    # or: from raytune_minicpmv.models.published import build_published; build_published("minicpmv2_6", dir)

What `build_tiny(..., layout="native")` cannot show: the users' own files. This folder holds the REAL `config.json`
(`model_type: minicpmv`, `auto_map` to remote code, top-level `patch_size`, `query_num`, `slice_config`,
`vision_config`, `version`) with only the sizes shrunk (LLM and vision hidden/intermediate/layers/heads;
`max_window_layers` follows the layer count), the real `preprocessor_config.json`, `generation_config.json`, the
ORIGINAL `tokenizer_config.json` (remote tokenizer class + `auto_map`), the real tokenizer files, random weights
under the official key names (`llm.*`, `vpm.*`, `resampler.*`) in sharded safetensors with
`model.safetensors.index.json`, and EMPTY placeholder files named like the remote-code `.py` files (nothing in them
runs; they only make the folder look, and be copied, like the real one).

Sources (copied into the repo, provenance in tests/assets/SOURCES.md): 2.6 = `tests/assets/minicpmv26_hf_layout/`
(+ tokenizer files from `tests/assets/minicpmv26_tokenizer/`: vocab 151666, so the embedding keeps its real height);
2.5 = `tests/assets/configs/minicpmv25_config/`, whose real `tokenizer.json` is not available: the tiny llama3
tokenizer stands in, with the original `tokenizer_class`/`auto_map` written into its `tokenizer_config.json`.
Both need a source checkout (tests/ is not installed); pass `source=` / `tokenizer=` to build from other copies.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from .registry import get_family

ASSETS = Path(__file__).resolve().parents[2] / "tests" / "assets"
SOURCES = {"minicpmv2_6": ASSETS / "minicpmv26_hf_layout", "minicpmv2_5": ASSETS / "configs" / "minicpmv25_config"}
REAL_TOKENIZERS = {"minicpmv2_6": ASSETS / "minicpmv26_tokenizer"}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "added_tokens.json", "special_tokens_map.json")
# Remote-code files of the real folders beyond those named by an auto_map (the 2.6 repo listing).
EXTRA_CODE_FILES = {"minicpmv2_6": ("modeling_navit_siglip.py", "resampler.py")}
# Default shrunk sizes: GQA kept (4 query heads over 2 kv heads), hidden >= 128 (resampler heads = hidden // 128).
SIZES = dict(llm_hidden=128, llm_layers=2, llm_heads=4, llm_kv_heads=2, llm_intermediate=256,
             vision_hidden=64, vision_layers=2, vision_heads=2, vision_intermediate=128)


def build_published(family: str, out_dir, *, source=None, tokenizer=None, seed: int = 0,
                    dtype: torch.dtype = torch.bfloat16, num_shards: int = 4, **sizes: Optional[int]) -> Path:
    """Write the published-layout fixture for `family` (2.6 or 2.5) into `out_dir` and return it.

    `sizes`: any of SIZES' keys (None = default). `dtype` bfloat16 like the real weights (2.5's config says float16;
    its torch_dtype is set to what is written). `num_shards`: target shard count (a tensor is never split).
    """
    fam = get_family(family)
    fam.check_supported()
    unknown = set(sizes) - set(SIZES)
    if unknown:
        raise TypeError(f"build_published: unknown size arguments {sorted(unknown)} (known: {', '.join(SIZES)})")
    size = {k: (sizes.get(k) if sizes.get(k) is not None else v) for k, v in SIZES.items()}
    src = Path(source) if source else _existing(SOURCES.get(fam.name), fam.name, "source")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    raw = json.loads((src / "config.json").read_text())
    config = shrink_config(raw, size, dtype)
    torch.manual_seed(seed)
    model = fam.model_class(fam.config_class.from_checkpoint_dict(config)).to(dtype)
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(str(out), max_shard_size=max(1, total // num_shards + 1))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")  # the real file, not our class's

    for name in ("preprocessor_config.json", "generation_config.json"):
        shutil.copyfile(src / name, out / name)
    _write_tokenizer(fam.name, src, out, tokenizer)
    for name in remote_code_files(out) | set(EXTRA_CODE_FILES.get(fam.name, ())):
        (out / name).write_text("")  # placeholder: the real folder ships remote code under this name
    (out / "README.md").write_text(f"Random-weight test fixture in the published {fam.name} layout (not a model; "
                                   "built by raytune_minicpmv.models.published). The .py files are empty "
                                   "placeholders.\n")
    return out


# The skip list of openbmb/MiniCPM-V-2_6-int4's quantization_config: the resampler's `kv_proj`, every `out_proj`
# (resampler and vision attention) and `lm_head` stay bf16; the vision tower's q/k/v_proj and fc1/fc2 are NF4 (its
# safetensors keys, listed in OpenBMB/MiniCPM-V issue #595, carry `.weight.quant_state.bitsandbytes__nf4` there).
PUBLISHED_INT4_SKIP = ("out_proj", "kv_proj", "lm_head")


def build_published_int4(family: str, out_dir, *, skip=PUBLISHED_INT4_SKIP, **kwargs) -> Path:
    """The published layout of a bitsandbytes NF4 checkpoint (like openbmb/MiniCPM-V-2_6-int4): `build_published`'s
    folder, its weights quantized with the published skip list and saved packed (`.weight` uint8 + `.absmax`,
    `.quant_map`, `.nested_*`, `.quant_state.bitsandbytes__nf4`), and its REAL config.json plus the
    `quantization_config` transformers writes. Needs bitsandbytes (its CPU backend is enough). kwargs: as
    `build_published`."""
    import tempfile

    from .quantization import bnb_config
    from .registry import read_config_json

    fam = get_family(family)
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        plain = build_published(fam.name, Path(tmp) / "bf16", **kwargs)
        raw = read_config_json(plain)
        dtype = getattr(torch, raw["torch_dtype"])
        model = fam.model_class.from_pretrained(str(plain), config=fam.config_class.from_checkpoint_dict(raw),
                                                dtype=dtype, quantization_config=bnb_config("nf4", dtype, skip),
                                                device_map={"": "cpu"})
        model.save_pretrained(str(out))
        quant = read_config_json(out)["quantization_config"]
        for f in plain.iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".index.json")):
                shutil.copyfile(f, out / f.name)
    (out / "config.json").write_text(json.dumps({**raw, "quantization_config": quant}, indent=2) + "\n")
    return out


def shrink_config(raw: dict, size: dict, dtype: torch.dtype) -> dict:
    """The real config.json with only the size fields replaced (key order and every other value kept)."""
    cfg = copy.deepcopy(raw)
    cfg.update(hidden_size=size["llm_hidden"], num_hidden_layers=size["llm_layers"],
               num_attention_heads=size["llm_heads"], num_key_value_heads=size["llm_kv_heads"],
               intermediate_size=size["llm_intermediate"])
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = size["llm_layers"]
    cfg["vision_config"].update(hidden_size=size["vision_hidden"], num_hidden_layers=size["vision_layers"],
                                num_attention_heads=size["vision_heads"],
                                intermediate_size=size["vision_intermediate"])
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    return cfg


def remote_code_files(folder: Path) -> set[str]:
    """The `.py` names that the folder's config / tokenizer / processor `auto_map`s point at."""
    names = set()
    for cfg_name in ("config.json", "tokenizer_config.json", "preprocessor_config.json"):
        path = folder / cfg_name
        auto_map = json.loads(path.read_text()).get("auto_map", {}) if path.is_file() else {}
        for ref in auto_map.values():
            for r in (ref if isinstance(ref, list) else [ref]):
                if r:
                    names.add(r.rsplit(".", 1)[0] + ".py")
    return names


def _write_tokenizer(family: str, src: Path, out: Path, tokenizer) -> None:
    original = json.loads((src / "tokenizer_config.json").read_text())
    tok_dir = Path(tokenizer) if tokenizer else REAL_TOKENIZERS.get(family)
    if tok_dir is not None:
        tok_dir = _existing(tok_dir, family, "tokenizer")
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copyfile(tok_dir / name, out / name)
        shutil.copyfile(src / "tokenizer_config.json", out / "tokenizer_config.json")  # the ORIGINAL, untouched
        return
    # No real tokenizer.json for this family: the tiny one stands in, under the original class + auto_map.
    from raytune_minicpmv.models.tiny_tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(out, get_family(family).llm_type)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.update({k: original[k] for k in ("tokenizer_class", "auto_map") if k in original})
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _existing(path: Optional[Path], family: str, what: str) -> Path:
    if path is None or not Path(path).is_dir():
        raise FileNotFoundError(f"build_published({family!r}): no {what} directory {path} (it lives in the repo's "
                                f"tests/assets/; from an installed package pass {what}=<dir>)")
    return Path(path)
