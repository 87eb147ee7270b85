"""A small, deterministic fast tokenizer for tests and the demo (no download, no remote code).

    from raytune_minicpmv.models.tiny_tokenizer import build_tiny_tokenizer
    path = build_tiny_tokenizer("/tmp/tok")                # Qwen2 / MiniCPM-V 2.6 flavour
    tok = AutoTokenizer.from_pretrained(path)              # -> fast tokenizer, ChatML chat_template

How: a byte-level BPE (the same pre-tokenization family as Qwen2 and Llama 3) is trained with the `tokenizers`
library on a fixed built-in English text, so every text encodes (all 256 bytes are in the alphabet) and two builds
give byte-identical files. The special tokens that MiniCPM-V's templates use are then appended *after* the learned
vocabulary, as in the real checkpoints, so id 0 stays an ordinary token (our collate pads with 0).

`llm_type` picks bos/eos/pad and the chat template: ``qwen2`` (ChatML with the default system prompt, like 2.6),
``llama3`` (the 2.5 tokenizer's template), ``minicpm`` (2.0 markers, no template). All flavours carry all markers.
The signature is a contract: `models.build_tiny()` calls it to put tokenizer files into tiny checkpoint dirs.
"""
from __future__ import annotations

import json
from pathlib import Path

VOCAB_SIZE = 1536

# Appended after the BPE vocabulary in this order (ids are therefore stable across builds).
SPECIAL_TOKENS = [
    "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>", "</point>",
    "<slice>", "</slice>", "<image_id>", "</image_id>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<用户>", "<AI>", "<s>", "</s>",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_FLAVOURS = {
    "qwen2": dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                  chat_template=CHATML_TEMPLATE),
    "llama3": dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<|end_of_text|>",
                   chat_template=LLAMA3_TEMPLATE),
    "minicpm": dict(bos_token="<s>", eos_token="</s>", pad_token="<unk>", chat_template=None),
}

# Training text: plain sentences close to what the sample data and tests say (shapes, colours, counting, chat),
# repeated so frequent words become single tokens. Fixed forever: changing it changes every token id.
_CORPUS = """\
You are a helpful assistant. Describe the image. What is in the picture? The picture shows a red circle on a
white background. There is a blue square next to a green triangle. How many shapes are there? There are three
shapes: one circle, one square and one triangle. What colour is the large rectangle? It is yellow. Compare the
two images. The first image is brighter than the second one. Read the text in the image. The sign says hello
world. Where is the small dot? The small dot is in the top left corner of the image, near the border.
Is this photo taken at night? No, it is a bright day with a clear sky. Count the stripes: there are seven
horizontal stripes and two vertical lines. Which object is closest to the camera? The orange ball is closest.
Thank you! You are welcome. Please answer briefly. Sure, here is a short answer. The answer is yes. The answer
is no. Explain your reasoning step by step. First, look at the left side; then look at the right side.
A cat sits on a mat. A dog runs in the park. The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6
7 8 9 10 11 12 13 14 15 16 20 32 64 100 448 1024. Grid, slice, crop, patch, token, label, model, train, data.
"""


def _training_lines() -> list[str]:
    # The fixed prose, plus generated phrases and numbers so the learned vocabulary reaches ~1.5k entries.
    colours = ["red", "green", "blue", "yellow", "orange", "purple", "black", "white", "grey", "pink", "brown"]
    shapes = ["circle", "square", "triangle", "rectangle", "line", "dot", "star", "ellipse", "stripe", "grid"]
    places = ["left", "right", "top", "bottom", "centre", "middle", "corner", "edge"]
    lines = _CORPUS.splitlines() * 4
    lines += [f"a {c} {s} at the {p}" for c in colours for s in shapes for p in places]
    lines += [" ".join(str(n) for n in range(k, k + 20)) for k in range(0, 2000, 20)]
    return lines


def trained_bpe():
    """The byte-level BPE of every tiny tokenizer (2.x and 4.x): VOCAB_SIZE tokens trained on the fixed corpus,
    before any special token is added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_lines(), trainer=trainer)
    return tok


def build_tiny_tokenizer(out_dir, llm_type: str = "qwen2") -> Path:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json to out_dir and return it."""
    from transformers import PreTrainedTokenizerFast

    llm_type = "qwen2" if llm_type == "qwen" else llm_type
    if llm_type not in _FLAVOURS:
        raise ValueError(f"llm_type {llm_type!r}: expected one of {', '.join(_FLAVOURS)} (or 'qwen')")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = trained_bpe()
    tok.add_special_tokens(SPECIAL_TOKENS)

    flavour = _FLAVOURS[llm_type]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token=flavour["bos_token"], eos_token=flavour["eos_token"],
        pad_token=flavour["pad_token"], model_max_length=131072, padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    if flavour["chat_template"]:
        fast.chat_template = flavour["chat_template"]
    fast.save_pretrained(str(out))
    _tidy_config(out / "tokenizer_config.json")
    return out


def _tidy_config(path: Path) -> None:
    # save_pretrained never adds a bos token for byte-level BPE (none of our templates want one from encode());
    # record that explicitly so loaders of any transformers version agree.
    cfg = json.loads(path.read_text())
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
