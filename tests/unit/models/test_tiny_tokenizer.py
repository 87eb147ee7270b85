"""The tiny tokenizer loads with plain AutoTokenizer, is deterministic and has every marker the templates use."""
import hashlib

import pytest
from transformers import AutoTokenizer

from raytune_minicpmv.models.tiny_tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer


def _digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_deterministic_and_loadable(tmp_path):
    a = build_tiny_tokenizer(tmp_path / "a")
    b = build_tiny_tokenizer(tmp_path / "b")
    assert _digest(a) == _digest(b)
    tok = AutoTokenizer.from_pretrained(a)
    assert 1000 <= len(tok) <= 2048
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<unk>")
    # every special token is one id, appended after the learned vocabulary (id 0 stays an ordinary token)
    ids = tok.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert ids == list(range(len(tok) - len(SPECIAL_TOKENS), len(tok)))
    assert tok.convert_ids_to_tokens(0) not in SPECIAL_TOKENS
    text = "<image_id>0</image_id><image><unk><unk></image><slice><unk></slice>\nhello"
    enc = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(enc) == text
    assert enc[:2] == tok.convert_tokens_to_ids(["<image_id>", "0"])


def test_chatml_template_with_default_system(tmp_path):
    tok = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                   tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n")


@pytest.mark.parametrize("llm_type,bos,eos", [("llama3", "<|begin_of_text|>", "<|end_of_text|>"),
                                              ("minicpm", "<s>", "</s>")])
def test_other_flavours(tmp_path, llm_type, bos, eos):
    tok = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path, llm_type))
    assert (tok.bos_token, tok.eos_token) == (bos, eos)
    assert tok.convert_tokens_to_ids(["<用户>", "<AI>", "<|eot_id|>"]) != [tok.unk_token_id] * 3


def test_unknown_flavour(tmp_path):
    with pytest.raises(ValueError, match="llm_type"):
        build_tiny_tokenizer(tmp_path, "gpt2")
