"""Generation prompts are training rows cut before the last answer: they equal the chat template's generation prompt
(real 2.6 tokenizer) and the training prefix of the same conversation with its answer (2.6, and 2.5's Llama 3
format), images and crops included."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raytune_minicpmv.data.records import RawRecord
from raytune_minicpmv.data.slicing import plan_slices
from raytune_minicpmv.data.templates import ModelSpec, TokenizerInfo, image_placeholder
from raytune_minicpmv.infer.prompts import (PLACEHOLDER_ANSWER, chat_record, prompt_batch, prompt_of, prompt_rows,
                                            table_rows, with_answer_slot)
from raytune_minicpmv.models.tiny_tokenizer import build_tiny_tokenizer

ASSETS = Path(__file__).resolve().parents[2] / "assets"
QWEN = ModelSpec("qwen2", max_slice_nums=4)


@pytest.fixture(scope="module")
def real26():
    return TokenizerInfo.load(ASSETS / "minicpmv26_tokenizer")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    paths = []
    for i, size in enumerate([(120, 90), (900, 500)]):  # the second is sliced
        Image.new("RGB", size, (40 * i, 200, 90)).save(d / f"{i}.png")
        paths.append(str(d / f"{i}.png"))
    return paths


def _prompt(raw, spec, tok):
    rows, has = prompt_rows([raw], spec, tok, max_length=4096)
    return prompt_of(table_rows(rows)[0], has[0])


def _raw(conv, image=None, system=None):
    rec = {"id": "r", "conversations": conv, **({"image": image} if image else {}),
           **({"system": system} if system else {})}
    return RawRecord("/d/x.json", 0, json.dumps(rec, ensure_ascii=False))


@pytest.mark.parametrize("question", ["What is this?", "Describe it.\n", "数一数有几个", "  two  spaces  "])
def test_question_prompt_is_the_templates_generation_prompt(real26, images, question):
    p = _prompt(chat_record(images[:1], question), QWEN, real26)
    placeholder = image_placeholder(QWEN, plan_slices((120, 90), QWEN.max_slice_nums).grid, 0)
    text = real26.tokenizer.apply_chat_template([{"role": "user", "content": placeholder + "\n" + question.strip()}],
                                                tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert p.input_ids.tolist() == real26.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert not p.has_reference and real26.tokenizer.decode(p.reference_ids) == PLACEHOLDER_ANSWER + "<|im_end|>"
    assert len(p.pixel_values) == 1 and p.image_bound.shape == (1, 2)
    assert (p.input_ids[p.image_bound[0, 0]:p.image_bound[0, 1]] == real26.unk).all()


def test_train_and_infer_prompts_agree_multi_turn_and_two_images(real26, images):
    tags = {"<image_00>": images[0], "<image_01>": images[1]}
    turns = [{"role": "user", "content": "<image_00>\n<image_01>\nCompare them."},
             {"role": "assistant", "content": "The first is smaller."}, {"role": "user", "content": "Colours?"}]
    answer = "Both are green."
    train = _prompt(_raw(turns + [{"role": "assistant", "content": answer}], tags, system="Be brief."), QWEN, real26)
    infer = _prompt(_raw(turns, tags, system="Be brief."), QWEN, real26)
    assert train.input_ids.tolist() == infer.input_ids.tolist()
    assert train.has_reference and real26.tokenizer.decode(train.reference_ids) == answer + "<|im_end|>"
    n_crops = 1 + int(np.prod(plan_slices((900, 500), QWEN.max_slice_nums).grid))
    assert len(infer.pixel_values) == len(infer.image_bound) == 1 + n_crops > 2
    assert np.array_equal(train.image_bound, infer.image_bound) and np.array_equal(train.tgt_sizes, infer.tgt_sizes)
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(train.pixel_values, infer.pixel_values))
    text = real26.tokenizer.decode(infer.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "The first is smaller.<|im_end|>" in text
    # chat_record writes the same conversation (the images in the first turn, tagged in order)
    chat = _prompt(chat_record(images, "Colours?", [("Compare them.", "The first is smaller.")], "Be brief."),
                   QWEN, real26)
    assert chat.input_ids.tolist() == infer.input_ids.tolist()


def test_llama3_prompt_ends_with_the_assistant_header_and_matches_training(tmp_path, images):
    tok = TokenizerInfo.load(build_tiny_tokenizer(tmp_path, "llama3"))
    spec = ModelSpec("llama3", query_num=96, use_image_id=False)
    turns = [{"role": "user", "content": "What colour is it?"}]
    infer = _prompt(_raw(turns, images[0]), spec, tok)
    train = _prompt(_raw(turns + [{"role": "assistant", "content": "Green."}], images[0]), spec, tok)
    assert infer.input_ids.tolist() == train.input_ids.tolist()
    assert tok.tokenizer.decode(infer.input_ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.tokenizer.decode(train.reference_ids) == "Green.<|eot_id|>"


def test_answer_slot_only_for_records_ending_with_a_question():
    q = _raw([{"role": "user", "content": "Hi"}])
    a = _raw([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    slotted, has = with_answer_slot(q)
    assert not has and json.loads(slotted.text)["conversations"][-1] == {"role": "assistant",
                                                                         "content": PLACEHOLDER_ANSWER}
    assert with_answer_slot(a) == (a, True)
    broken = RawRecord("/d/x.json", 1, "{not json")
    assert with_answer_slot(broken) == (broken, True)  # left for parse_record to report


def test_left_padded_batch_shifts_image_bounds(real26, images):
    long = _prompt(chat_record(images[:1], "A much longer question about the picture, with more words."), QWEN, real26)
    short = _prompt(chat_record([], "Hi"), QWEN, real26)
    b = prompt_batch([long, short], pad_id=0)
    pad = len(long.input_ids) - len(short.input_ids)
    assert b["input_ids"][1, :pad].eq(0).all() and b["attention_mask"][1].tolist() == [0] * pad + [1] * (
        b["input_ids"].shape[1] - pad)
    assert b["input_ids"][1, pad:].tolist() == short.input_ids.tolist()
    assert b["image_bound"][0].tolist() == long.image_bound.tolist() and b["pixel_values"][1] == []
