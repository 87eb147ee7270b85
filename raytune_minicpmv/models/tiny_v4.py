"""Tiny random MiniCPM-V 4.6 / 4.7 checkpoints, built from transformers' own config classes (no downloads).

    from raytune_minicpmv.models import build_tiny
    ckpt = build_tiny("minicpmv4_6", "/tmp/tiny46")        # ~2 MB, seconds; processor = load_processor4(ckpt)

`build_tiny` hands 4.x families here. The folder is what `save_pretrained` writes for a real one: `config.json`
(model_type minicpmv4_6 / minicpmv4_7, a nested `qwen3_5_text` text config, `vision_config`), sharded safetensors
above `max_shard_size` with `model.safetensors.index.json`, `generation_config.json`, plus the tokenizer, processor
configs and chat template of `tiny_processor4.write_processor_files` (the tiny 4.x tokenizer, or the one in the
`tokenizer` directory; `downsample_mode`, `max_slice_nums` go to the processor and config.json alike). The token ids
of config.json (`image_token_id`, `video_token_id`; 4.7's `image_start_id`, `image_end_id`, `slice_start_id`,
`slice_end_id`, `newline_id`) are read from that tokenizer, so model, tokenizer and processor agree as in a real
checkpoint.

Shape: the real layout at toy width — SigLIP2-style vision tower (`vision_layers` 3, the window-attention merger
after layer `insert_layer_id` 1), the 2x2 `merger`, a Qwen3.5 text model of `llm_layers` 4 = 3 Gated-DeltaNet
linear-attention layers + 1 full-attention layer (the real 3:1 pattern), `lm_head` tied to `embed_tokens` like the
real 4.6 (`tie_word_embeddings`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


def build_tiny_v4(family: str, out_dir, *, tokenizer: Optional[str] = None, llm_hidden: int = 64,
                  llm_layers: int = 4, vision_hidden: int = 32, vision_layers: int = 3, vocab_size: Optional[int] = None,
                  downsample_mode: str = "16x", max_slice_nums: int = 9, seed: int = 0,
                  dtype: torch.dtype = torch.float32, max_shard_size: str = "2GB",
                  text_overrides: Optional[dict] = None, vision_overrides: Optional[dict] = None,
                  llm_init_std: Optional[float] = None) -> Path:
    """Write a random-weight 4.6 / 4.7 checkpoint directory for `family` and return its path.

    `text_overrides` / `vision_overrides` replace fields of the derived text / vision config (e.g. a real model's
    dims for a GPU benchmark: benchmarks/workload.py `build_model_v46`).
    `llm_init_std`: draw the LLM layers' matrices from N(0, std) instead of the config's initializer_range (0.02).
    With the tied head, a toy model at 0.02 only repeats its last input token (the residual stream is ~ its own
    embedding); generation tests use 0.1 so greedy answers are varied token sequences."""
    from transformers import AutoTokenizer

    from .registry import get_family
    from .tiny_processor4 import write_processor_files

    fam = get_family(family)
    if llm_layers % 4:
        raise ValueError(f"llm_layers={llm_layers}: must be a multiple of 4 (3 linear-attention + 1 full-attention "
                         "layers per block, as in Qwen3.5)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_processor_files(out, fam.name, downsample_mode=downsample_mode, max_slice_nums=max_slice_nums,
                          tokenizer=tokenizer)
    tok = AutoTokenizer.from_pretrained(str(out))
    fields = _config_fields(fam.name, tok, llm_hidden, llm_layers, vision_hidden, vision_layers, vocab_size,
                            downsample_mode)
    fields["text_config"].update(text_overrides or {})
    fields["vision_config"].update(vision_overrides or {})
    config = fam.config_class(**fields)
    torch.manual_seed(seed)
    model = fam.model_class(config)
    if llm_init_std is not None:
        with torch.no_grad():
            for p in model.model.language_model.layers.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, llm_init_std)
    model = model.to(dtype)
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    return out


def _config_fields(family: str, tok, llm_hidden: int, llm_layers: int, vision_hidden: int, vision_layers: int,
                   vocab_size: Optional[int], downsample_mode: str) -> dict:
    from .tiny_processor4 import structural_token_ids

    ids = structural_token_ids(tok)
    heads = max(2, llm_hidden // 32)
    text = dict(model_type="qwen3_5_text", vocab_size=max(vocab_size or 0, len(tok)), hidden_size=llm_hidden,
                intermediate_size=2 * llm_hidden, num_hidden_layers=llm_layers, num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2), head_dim=llm_hidden // heads * 2,
                linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=ids["eos_token_id"],
                pad_token_id=ids["pad_token_id"])
    vision = dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
                  num_attention_heads=2, image_size=980, patch_size=14)
    fields = dict(text_config=text, vision_config=vision, insert_layer_id=1, image_size=448,
                  image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
                  downsample_mode=downsample_mode, tie_word_embeddings=True)
    if family == "minicpmv4_7":  # the canvas M-RoPE locates the visual spans by these ids (the model raises without)
        fields.update({k: ids[k] for k in ("image_start_id", "image_end_id", "slice_start_id", "slice_end_id",
                                           "newline_id")})
    return fields
