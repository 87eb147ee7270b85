"""The non-weight files of a tiny MiniCPM-V 4.6 / 4.7 checkpoint: tokenizer, processor configs, chat template.

    from raytune_minicpmv.models.tiny_processor4 import write_processor_files, structural_token_ids
    write_processor_files("/tmp/tiny46", "minicpmv4_6", downsample_mode="16x")
    proc = load_processor4("/tmp/tiny46")        # (models.processor4) -> transformers' MiniCPMV4_6Processor
    ids = structural_token_ids(proc.tokenizer)                   # image_token_id, ..., newline_id for config.json

`models.build_tiny` writes the weights and config.json next to these files. No download, no remote code: the
processor, image processor and video processor are transformers' own classes (their `save_pretrained` writes
`processor_config.json` / `preprocessor_config.json` / `video_preprocessor_config.json`); only the tokenizer is ours.

The tokenizer is the byte-level BPE of `tiny_tokenizer` (same fixed corpus, same vocabulary size) with the special
tokens the 4.6/4.7 processor and chat template use appended after the learned vocabulary, as in the real
checkpoints. The named ones (`image_token`, `image_start_token`, ...) are recorded as `extra_special_tokens`, which
is how the real tokenizer_config.json gives the processor its `tokenizer.image_token` etc. `<think>`/`</think>` are
added tokens but not special (as in Qwen3): a record may write a think block, it is ordinary trained text.

The chat template is ChatML with the Qwen3-family thinking convention (the real 4.6/4.7 templates come from
Qwen3.5): the answer after the last user turn gets ``<think>\\n{reasoning}\\n</think>\\n\\n`` (an empty block when
the content has none), earlier answers lose their think block, a generation prompt ends ``<think>\\n`` or, with
``enable_thinking=False``, ``<think>\\n\\n</think>\\n\\n``. Content may be a string or a list of
``{"type": "image"|"video"|"text"}`` parts; an image part renders as ``<|image_pad|>`` (the processor expands it).
The data stage never relies on these details: it renders with whatever template the checkpoint ships.
"""
from __future__ import annotations

import json
from pathlib import Path

from .processor4 import FAMILIES4, processor_class

# name -> token, exactly the attributes MiniCPMV4_6Processor / MiniCPMV4_7Processor read from the tokenizer.
NAMED_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "image_start_token": "<image>",
    "image_end_token": "</image>",
    "slice_start_token": "<slice>",
    "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
}
# Appended in this order after the BPE vocabulary (ids stable across builds).
SPECIAL_TOKENS4 = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", *NAMED_TOKENS.values(),
                   "<|vision_start|>", "<|vision_end|>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>",
                   "<point>", "</point>"]
THINK_TOKENS = ["<think>", "</think>"]

CHAT_TEMPLATE4 = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part.type == 'image' -%}{{ '<|image_pad|>' }}"
    "{%- elif part.type == 'video' -%}{{ '<|video_pad|>' }}"
    "{%- elif part.type == 'text' -%}{{ part.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- set content = render(m.content) | string -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set reasoning = '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > ns.last_query -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- else -%}{{- '<think>\\n' -}}{%- endif -%}{%- endif -%}"
)


def build_tiny_tokenizer4(out_dir) -> Path:
    """Write the 4.6/4.7 tiny tokenizer (tokenizer.json + tokenizer_config.json) to out_dir and return it."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    from .tiny_tokenizer import trained_bpe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = trained_bpe()
    tok.add_special_tokens(SPECIAL_TOKENS4)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=dict(NAMED_TOKENS), model_max_length=262144, padding_side="right",
        clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE4
    fast.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(add_bos_token=False, add_eos_token=False)  # byte-level BPE: encode() adds nothing (as Qwen3.5)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
    return out


def write_processor_files(out_dir, family: str, *, downsample_mode: str = "16x", max_slice_nums: int = 9,
                          use_image_id: bool = True, tokenizer=None) -> Path:
    """Tokenizer + processor/preprocessor/video configs + chat template of a tiny `family` checkpoint in out_dir.

    `tokenizer`: a directory with a 4.6/4.7 tokenizer to copy instead of the tiny one (a real checkpoint's).
    After this, `AutoProcessor.from_pretrained(out_dir)` gives transformers' processor of the family (it reads the
    family from config.json, which `build_tiny` writes; `processor_config.json` names the class for the rest).
    """
    from transformers import AutoTokenizer
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil
    from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor

    if family not in FAMILIES4:
        raise ValueError(f"family {family!r}: expected one of {', '.join(FAMILIES4)}")
    if downsample_mode not in ("16x", "4x"):
        raise ValueError(f"downsample_mode {downsample_mode!r}: expected '16x' or '4x'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(tokenizer) if tokenizer else str(build_tiny_tokenizer4(out)))
    settings = dict(downsample_mode=downsample_mode, max_slice_nums=max_slice_nums, use_image_id=use_image_id)
    # The PIL backend: torchvision is not a dependency; the processor picks the backend from this config.
    image_processor = MiniCPMV4_6ImageProcessorPil(**settings)
    video_processor = MiniCPMV4_6VideoProcessor(**settings)
    proc = processor_class(family)(image_processor=image_processor, video_processor=video_processor,
                                    tokenizer=tok, chat_template=tok.chat_template)
    proc.save_pretrained(str(out))
    return out


def structural_token_ids(tokenizer) -> dict:
    """The token-id fields of a 4.6/4.7 config.json for this tokenizer (4.7 raises when the structural ones are
    missing): image_token_id, video_token_id, image_start_id, image_end_id, slice_start_id, slice_end_id,
    newline_id, plus pad_token_id / eos_token_id."""
    ids = {field: tokenizer.convert_tokens_to_ids(NAMED_TOKENS[name]) for field, name in (
        ("image_token_id", "image_token"), ("video_token_id", "video_token"), ("image_start_id", "image_start_token"),
        ("image_end_id", "image_end_token"), ("slice_start_id", "slice_start_token"),
        ("slice_end_id", "slice_end_token"))}
    newline = tokenizer.encode("\n", add_special_tokens=False)
    if len(newline) != 1:
        raise ValueError(f"'\\n' is not one token in this tokenizer ({newline})")
    return dict(ids, newline_id=newline[0], pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
