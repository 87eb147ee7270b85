"""The tiny 4.6/4.7 processor files load as transformers' own processors and carry every token they use."""
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from raytune_minicpmv.models.processor4 import family4_of, load_processor4
from raytune_minicpmv.models.tiny_processor4 import (NAMED_TOKENS, SPECIAL_TOKENS4, THINK_TOKENS, build_tiny_tokenizer4,
                                                     structural_token_ids, write_processor_files)


def _files(tmp_path, family, **kw):
    d = write_processor_files(tmp_path / family, family, **kw)
    (d / "config.json").write_text(json.dumps({"model_type": family}))  # build_tiny writes the real one
    return d


def test_tokenizer_deterministic_with_every_token(tmp_path):
    a, b = build_tiny_tokenizer4(tmp_path / "a"), build_tiny_tokenizer4(tmp_path / "b")
    digest = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(a.iterdir())}
    assert digest == {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(b.iterdir())}
    proc = load_processor4(_files(tmp_path, "minicpmv4_6"))
    tok = proc.tokenizer
    ids = tok.convert_tokens_to_ids(SPECIAL_TOKENS4 + THINK_TOKENS)
    assert ids == list(range(len(tok) - len(ids), len(tok)))  # appended after the BPE vocabulary
    for name, token in NAMED_TOKENS.items():  # what the processor reads from its tokenizer
        assert getattr(tok, name) == token and getattr(proc, name) == token
    assert proc.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    special = set(tok.all_special_tokens)
    assert set(NAMED_TOKENS.values()) <= special and not set(THINK_TOKENS) & special  # think: plain added text
    text = "<think>\nhm\n</think>\n\nok"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    ids = structural_token_ids(tok)
    assert tok.convert_ids_to_tokens(ids["newline_id"]) == "Ċ" and ids["slice_end_id"] == tok.convert_tokens_to_ids(
        "</slice>")


@pytest.mark.parametrize("family,cls", [("minicpmv4_6", "MiniCPMV4_6Processor"),
                                        ("minicpmv4_7", "MiniCPMV4_7Processor")])
def test_processor_loads_and_expands(tmp_path, family, cls):
    d = _files(tmp_path, family, downsample_mode="4x", max_slice_nums=4)
    assert family4_of(d) == family
    proc = load_processor4(d)
    assert type(proc).__name__ == cls
    assert (proc.image_processor.downsample_mode, proc.image_processor.max_slice_nums) == ("4x", 4)
    image = Image.fromarray(np.zeros((300, 900, 3), np.uint8))
    out = proc(text=["<|image_pad|>hi"], images=[image])
    ts = out["target_sizes"].numpy()
    # 4x: tokens per crop = patches / 4; every crop's pads sit between its markers
    assert int((out["input_ids"] == proc.image_token_id).sum()) == int(ts.prod(1).sum() // 4)
    assert len(ts) > 1 and ("mm_token_type_ids" in out) == (family == "minicpmv4_7")
    assert load_processor4(d, downsample_mode="16x").image_processor.downsample_mode == "16x"


def test_chat_template_thinking_prefixes(tmp_path):
    tok = load_processor4(_files(tmp_path, "minicpmv4_7")).tokenizer
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    two = user + [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"},
                  {"role": "assistant", "content": "<think>\nwhy\n</think>\n\nc"}]
    assert tok.apply_chat_template(two, tokenize=False) == (
        "<|im_start|>user\n<|image_pad|>hi<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
        "<|im_start|>user\nb<|im_end|>\n<|im_start|>assistant\n<think>\nwhy\n</think>\n\nc<|im_end|>\n")
    gen = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert gen.endswith("<|im_start|>assistant\n<think>\n")
    gen = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert gen.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
