"""MiniCPM-V 4.6 / 4.7 generation prompts are 4.x training rows cut before the last answer: they equal the model's
chat template generation prompt (non-thinking prefix, as training writes before every plain answer) through
transformers' processor, and the training prefix of the same record with its answer (multi-turn, two images,
sliced, system prompt); the batch is the processor's left-padded batch."""
import json

import numpy as np
import pytest
from PIL import Image

from raytune_minicpmv.data.family4 import Spec4
from raytune_minicpmv.data.records import RawRecord
from raytune_minicpmv.data.rows4 import preprocess_records4
from raytune_minicpmv.infer.prompts import chat_record, prompt_batch, prompt_of, prompt_rows, table_rows
from raytune_minicpmv.models.tiny_processor4 import build_tiny_tokenizer4, write_processor_files

FAMILIES = ["minicpmv4_6", "minicpmv4_7"]
IMG, TXT = {"type": "image"}, (lambda t: {"type": "text", "text": t})


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts4")
    tok = build_tiny_tokenizer4(root / "tok")
    infos = {}
    for fam in FAMILIES:
        d = write_processor_files(root / fam, fam, tokenizer=tok)
        (d / "config.json").write_text(json.dumps({"model_type": fam}))
        spec = Spec4(fam, str(d), "16x", 4)
        infos[fam] = spec, spec.load()
    paths = []
    for i, (h, w) in enumerate([(90, 120), (500, 900)]):  # the second is sliced
        arr = np.random.RandomState(i).randint(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    return infos, paths


def _prompt(raw, spec, info):
    rows, has = prompt_rows([raw], spec, info, max_length=8192)
    return prompt_of(table_rows(rows)[0], has[0])


def _processor(info, messages, images, **template_kwargs):
    text = info.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)
    return text, info.proc(text=[text], images=[Image.open(p).convert("RGB") for p in images] or None,
                           return_tensors="np")


@pytest.mark.parametrize("family", FAMILIES)
def test_question_prompt_is_the_templates_non_thinking_generation_prompt(env, family):
    (spec, info), paths = env[0][family], env[1]
    p = _prompt(chat_record(paths, "Compare them.", system="Be brief."), spec, info)
    assert not p.has_reference
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [IMG, IMG, TXT("Compare them.")]}]
    text, out = _processor(info, messages, paths, enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # the template's non-thinking prefix
    np.testing.assert_array_equal(p.input_ids, out["input_ids"][0])
    np.testing.assert_array_equal(p.pixel_values, out["pixel_values"][0])
    np.testing.assert_array_equal(p.target_sizes, out["target_sizes"])
    assert len(p.target_sizes) >= 3  # the second image is sliced
    if family == "minicpmv4_7":
        np.testing.assert_array_equal(p.mm_token_type_ids, out["mm_token_type_ids"][0])
    else:
        assert p.mm_token_type_ids is None and "mm_token_type_ids" not in out
    # the template's default generation prompt (thinking: an open <think>) is not what training put before answers
    thinking, _ = _processor(info, messages, paths)
    assert thinking.endswith("<|im_start|>assistant\n<think>\n") and thinking != text


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_is_the_training_prefix_of_the_record_with_its_answer(env, family):
    (spec, info), paths = env[0][family], env[1]
    conv = [{"role": "user", "content": "<image_00>\nWhat is it?"}, {"role": "assistant", "content": "A square."},
            {"role": "user", "content": "And <image_01> this one?"}, {"role": "assistant", "content": "Stripes, 3."}]
    record = {"id": "r", "system": "Be brief.", "image": {"<image_00>": paths[0], "<image_01>": paths[1]},
              "conversations": conv}
    with_answer = RawRecord("/d/x.json", 0, json.dumps(record))
    question = RawRecord("/d/x.json", 0, json.dumps({**record, "conversations": conv[:-1]}))
    row = table_rows(preprocess_records4([with_answer], info, family, 8192))[0]  # what training trains on
    p_q, p_a = _prompt(question, spec, info), _prompt(with_answer, spec, info)
    n = len(p_q.input_ids)
    np.testing.assert_array_equal(p_q.input_ids, np.asarray(row["input_ids"])[:n])
    np.testing.assert_array_equal(p_a.input_ids, p_q.input_ids)
    labels = np.asarray(row["labels"])
    assert labels[n - 1] != -100 and np.all(labels[n - 3:n - 1] == -100)  # the answer's first token is trained
    assert info.tokenizer.decode(p_a.reference_ids) == "Stripes, 3.<|im_end|>" and p_a.has_reference
    np.testing.assert_array_equal(p_q.target_sizes, np.asarray(row["tgt_sizes"]).reshape(-1, 2))
    np.testing.assert_array_equal(p_q.pixel_values, p_a.pixel_values)
    assert p_q.pixel_values.shape[-1] == int(np.prod(p_q.target_sizes, axis=1).sum()) * 14
    if family == "minicpmv4_7":
        np.testing.assert_array_equal(p_q.mm_token_type_ids, np.asarray(row["mm_token_type_ids"])[:n])
    # and it is the template's generation prompt of the conversation so far (earlier answers as training renders them)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [IMG, TXT("What is it?")]},
                {"role": "assistant", "content": "A square."},
                {"role": "user", "content": [TXT("And"), IMG, TXT("this one?")]}]
    np.testing.assert_array_equal(p_q.input_ids, _processor(info, messages, paths, enable_thinking=False)[1]
                                  ["input_ids"][0])


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_is_the_processors_left_padded_batch(env, family):
    (spec, info), paths = env[0][family], env[1]
    prompts = [_prompt(chat_record([], "Hi there, how long is a day?"), spec, info),
               _prompt(chat_record(paths[1:], "What is it?"), spec, info)]
    batch = prompt_batch(prompts, downsample_mode="16x")
    texts = [info.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True, enable_thinking=False)
             for m in ([{"role": "user", "content": "Hi there, how long is a day?"}],
                       [{"role": "user", "content": [IMG, TXT("What is it?")]}])]
    ref = info.proc(text=texts, images=[Image.open(paths[1]).convert("RGB")], padding=True, padding_side="left",
                    return_tensors="pt")
    keys = {"input_ids", "attention_mask", "pixel_values", "target_sizes"} | (
        {"mm_token_type_ids"} if family == "minicpmv4_7" else set())
    assert set(batch) == keys | {"downsample_mode"} and batch["downsample_mode"] == "16x"
    assert (batch["attention_mask"][0] == 0).any()  # the shorter prompt is padded on the left
    for k in keys:
        pad_ok = batch[k] if k != "input_ids" else batch[k].masked_fill(batch["attention_mask"] == 0, -1)
        want = ref[k] if k != "input_ids" else ref[k].masked_fill(ref["attention_mask"] == 0, -1)
        assert pad_ok.tolist() == want.tolist(), k
