"""Tiny random MiniCPM-V 4.6 / 4.7 checkpoints, built from transformers' own config classes (no downloads).

    from raytune_minicpmv.models import build_tiny
    ckpt = build_tiny("minicpmv4_6", "/tmp/tiny46", tokenizer="/path/to/processor_files")   # ~2 MB, seconds

`build_tiny` hands 4.x families here. The folder is what `save_pretrained` writes for a real one: `config.json`
(model_type minicpmv4_6 / minicpmv4_7, a nested `qwen3_5_text` text config, `vision_config`), sharded safetensors
above `max_shard_size` with `model.safetensors.index.json`, `generation_config.json`, plus the tokenizer and
processor files copied from `tokenizer` (a directory holding them: `tokenizer*.json`, `processor_config.json`,
`preprocessor_config.json`, `chat_template*`, ...). The special-token ids of config.json (`image_token_id`,
`video_token_id`; 4.7's `image_start_id`, `image_end_id`, `slice_start_id`, `slice_end_id`, `newline_id`) are read
from that tokenizer, so model, tokenizer and processor agree as in a real checkpoint.

Shape: the real layout at toy width — SigLIP2-style vision tower (`vision_layers` 3, the window-attention merger
after layer `insert_layer_id` 1), the 2x2 `merger`, a Qwen3.5 text model of `llm_layers` 4 = 3 Gated-DeltaNet
linear-attention layers + 1 full-attention layer (the real 3:1 pattern), `lm_head` tied to `embed_tokens` like the
real 4.6 (`tie_word_embeddings`).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch

# Files of a processor folder that belong in a checkpoint next to the weights (everything else is left behind).
_PROCESSOR_FILES = ("tokenizer", "processor_config", "preprocessor_config", "video_preprocessor_config",
                    "special_tokens_map", "chat_template", "vocab.json", "merges.txt", "added_tokens")


def build_tiny_v4(family: str, out_dir, *, tokenizer: Optional[str] = None, llm_hidden: int = 64,
                  llm_layers: int = 4, vision_hidden: int = 32, vision_layers: int = 3, vocab_size: Optional[int] = None,
                  downsample_mode: str = "16x", seed: int = 0, dtype: torch.dtype = torch.float32,
                  max_shard_size: str = "2GB") -> Path:
    """Write a random-weight 4.6 / 4.7 checkpoint directory for `family` and return its path."""
    from .registry import get_family

    fam = get_family(family)
    if tokenizer is None:
        raise ValueError(f"build_tiny({family!r}): pass tokenizer=<dir> with the tokenizer and processor files of "
                         "the family (the data stage writes tiny ones)")
    if llm_layers % 4:
        raise ValueError(f"llm_layers={llm_layers}: must be a multiple of 4 (3 linear-attention + 1 full-attention "
                         "layers per block, as in Qwen3.5)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _copy_processor_files(Path(tokenizer), out)
    config = fam.config_class(**_config_fields(fam.name, tok, llm_hidden, llm_layers, vision_hidden, vision_layers,
                                               vocab_size, downsample_mode))
    torch.manual_seed(seed)
    model = fam.model_class(config).to(dtype)
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    return out


def _copy_processor_files(src: Path, out: Path):
    from transformers import AutoTokenizer

    if not src.is_dir():
        raise ValueError(f"tokenizer={src}: not a directory of tokenizer/processor files")
    for f in src.iterdir():
        if f.is_file() and f.name.startswith(_PROCESSOR_FILES):
            shutil.copy2(f, out / f.name)
    return AutoTokenizer.from_pretrained(str(out))


def _token_id(tok, token: str) -> int:
    ids = tok.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"tokenizer: {token!r} is not one token ({ids}); the 4.x processor needs it as a "
                         "special token")
    return ids[0]


def _config_fields(family: str, tok, llm_hidden: int, llm_layers: int, vision_hidden: int, vision_layers: int,
                   vocab_size: Optional[int], downsample_mode: str) -> dict:
    heads = max(2, llm_hidden // 32)
    text = dict(model_type="qwen3_5_text", vocab_size=max(vocab_size or 0, len(tok)), hidden_size=llm_hidden,
                intermediate_size=2 * llm_hidden, num_hidden_layers=llm_layers, num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2), head_dim=llm_hidden // heads * 2,
                linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
                  num_attention_heads=2, image_size=980, patch_size=14)
    fields = dict(text_config=text, vision_config=vision, insert_layer_id=1, image_size=448,
                  image_token_id=_token_id(tok, tok.image_token), video_token_id=_token_id(tok, tok.video_token),
                  downsample_mode=downsample_mode, tie_word_embeddings=True)
    if family == "minicpmv4_7":  # the canvas M-RoPE locates the visual spans by these ids (the model raises without)
        fields.update(image_start_id=_token_id(tok, tok.image_start_token),
                      image_end_id=_token_id(tok, tok.image_end_token),
                      slice_start_id=_token_id(tok, tok.slice_start_token),
                      slice_end_id=_token_id(tok, tok.slice_end_token), newline_id=_token_id(tok, "\n"))
    return fields
