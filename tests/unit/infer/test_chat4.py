"""`raytune-minicpmv chat` on tiny MiniCPM-V 4.6 / 4.7 checkpoints: the CLI (`cli.main`) with a LoRA adapter of a
training checkpoint streams exactly the in-process greedy answer of the adapted model; the interactive loop keeps
the conversation (its second prompt is the training prefix of the two-turn record); 4.7 streams what it returns."""
import io
import json
import sys

import pytest
import torch
from PIL import Image

from raytune_minicpmv.infer.chat import ChatSession, run_chat
from raytune_minicpmv.infer.generation import GenerationSettings

SETTINGS = GenerationSettings(max_new_tokens=4)


@pytest.fixture(scope="module")
def setup(gen46, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from raytune_minicpmv.models import load_model
    from raytune_minicpmv.models.adapter_files import save_adapter
    from raytune_minicpmv.models.registry import V4_LORA_TARGETS

    root = tmp_path_factory.mktemp("chat4")
    torch.manual_seed(0)
    peft = get_peft_model(load_model(gen46, dtype=torch.float32), LoraConfig(
        r=4, lora_alpha=64, target_modules=V4_LORA_TARGETS, init_lora_weights=False))
    save_adapter(peft, root / "run" / "checkpoint_step_0000002" / "adapter")  # a training checkpoint's layout
    image = root / "red.png"
    Image.new("RGB", (200, 150), (220, 30, 30)).save(image)
    return gen46, root / "run" / "checkpoint_step_0000002", str(image)


def test_cli_streams_the_greedy_answer_of_the_adapted_46_model(setup, capsys):
    from raytune_minicpmv.cli import main

    ckpt, adapter, image = setup
    # in-process (the 2.6 test runs the console in a subprocess; this saves its imports): stdout is the streamed answer
    assert main(["chat", "--model", str(ckpt), "--adapter", str(adapter), "--image", image, "--max-new-tokens", "4",
                 "--device", "cpu", "What colour is it?"]) == 0
    streamed = capsys.readouterr().out
    adapted = ChatSession(str(ckpt), str(adapter), (image,), SETTINGS, device="cpu")
    expected = adapted.ask("What colour is it?")
    assert expected and streamed == expected + "\n"
    assert type(adapted.model).__name__ == "MiniCPMV4_6ForConditionalGeneration"  # merged: no PEFT wrapper
    base = ChatSession(str(ckpt), None, (image,), SETTINGS, device="cpu")
    name = "model.language_model.layers.0.linear_attn.in_proj_qkv.weight"  # a LoRA target (linear attention)
    assert not torch.equal(dict(base.model.named_parameters())[name], dict(adapted.model.named_parameters())[name])
    assert base.ask("What colour is it?") != expected  # the adapter changes the answer


def test_interactive_loop_keeps_the_conversation(setup, monkeypatch):
    from raytune_minicpmv.infer.prompts import chat_record, prompt_of, prompt_rows, table_rows

    ckpt, _, image = setup

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("What colour is it?\nAnd the shape?\n\n"))
    out = io.StringIO()
    session = ChatSession(str(ckpt), None, (image,), SETTINGS, device="cpu")
    assert run_chat(session, None, stdin=sys.stdin, stdout=out) == 0
    (q1, a1), (q2, a2) = session.history
    text = out.getvalue()
    assert f"model> {a1}\n" in text and f"model> {a2}\n" in text and text.count("you> ") == 3
    # the second turn's prompt is the training prefix of the two-turn record with its answers
    record = json.loads(chat_record([image], q2, [(q1, a1)]).text)
    record["conversations"].append({"role": "assistant", "content": a2})
    from raytune_minicpmv.data.records import RawRecord
    from raytune_minicpmv.data.rows4 import preprocess_records4

    row = table_rows(preprocess_records4([RawRecord("<chat>", 0, json.dumps(record))], session.tok,
                                         "minicpmv4_6", 8192))[0]
    rows, has = prompt_rows([chat_record([image], q2, [(q1, a1)])], session.spec, session.tok, 8192)
    prompt = prompt_of(table_rows(rows)[0], has[0])
    assert list(prompt.input_ids) == list(row["input_ids"][:len(prompt.input_ids)])
    assert session.tok.tokenizer.decode(prompt.input_ids).count("<|im_start|>assistant") == 2


def test_47_streams_what_it_returns(gen47, setup):
    _, _, image = setup
    out = io.StringIO()
    session = ChatSession(str(gen47), None, (image,), SETTINGS, device="cpu")
    answer = session.ask("What colour is it?", stream=out)
    assert answer and out.getvalue() == answer + "\n"
