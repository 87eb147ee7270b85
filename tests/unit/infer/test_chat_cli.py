"""`raytune-minicpmv chat` on a tiny model with a LoRA adapter of a training checkpoint: the CLI (a subprocess)
streams exactly the in-process greedy answer; the interactive mode on a terminal (a pty) keeps the conversation;
bad inputs are one-line errors. The adapter is applied as PEFT applies it (merged in memory)."""
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from raytune_minicpmv.infer.chat import ChatSession
from raytune_minicpmv.infer.generation import GenerationSettings

REPO = Path(__file__).resolve().parents[3]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
SETTINGS = GenerationSettings(max_new_tokens=5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from raytune_minicpmv.models import build_tiny, load_model
    from raytune_minicpmv.models.adapter_files import save_adapter

    root = tmp_path_factory.mktemp("chat")
    ckpt = build_tiny("minicpmv2_6", root / "base", max_slice_nums=1)
    torch.manual_seed(0)
    peft = get_peft_model(load_model(ckpt, dtype=torch.float32), LoraConfig(
        r=4, lora_alpha=64, target_modules=r"llm\..*layers\.\d+\.self_attn\.(q_proj|v_proj)", init_lora_weights=False))
    save_adapter(peft, root / "run" / "checkpoint_step_0000002" / "adapter")  # a training checkpoint's layout
    image = root / "red.png"
    Image.new("RGB", (200, 150), (220, 30, 30)).save(image)
    return ckpt, root / "run" / "checkpoint_step_0000002", str(image)


def test_cli_streams_the_greedy_answer_of_the_adapted_model(setup):
    ckpt, adapter, image = setup
    run = subprocess.run([sys.executable, "-m", "raytune_minicpmv.cli", "chat", "--model", str(ckpt), "--adapter",
                          str(adapter), "--image", image, "--max-new-tokens", "5", "What colour is it?"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    adapted = ChatSession(str(ckpt), str(adapter), (image,), SETTINGS, device="cpu")
    expected = adapted.ask("What colour is it?")
    assert expected and run.stdout == expected + "\n"
    base = ChatSession(str(ckpt), None, (image,), SETTINGS, device="cpu")
    b = base.model.llm.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(b, adapted.model.llm.model.layers[0].self_attn.q_proj.weight)  # the LoRA was merged in
    assert type(adapted.model).__name__ == "MiniCPMV26"  # unwrapped: decoding runs at base speed


def test_adapter_merged_in_memory_equals_the_peft_model(setup):
    from peft import PeftModel

    from raytune_minicpmv.infer.generation import load_for_inference, unwrap
    from raytune_minicpmv.models import load_model

    ckpt, adapter, _ = setup
    merged, _, _ = load_for_inference(ckpt, adapter, device="cpu")
    peft = PeftModel.from_pretrained(load_model(ckpt, dtype=torch.float32), str(adapter / "adapter")).eval()
    ids = torch.tensor([[5, 17, 99, 3, 250]])
    with torch.no_grad():
        a = merged.llm(input_ids=ids).logits
        b = unwrap(peft).llm(input_ids=ids).logits
        c = load_model(ckpt, dtype=torch.float32).eval().llm(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (a - c).abs().max() > 1e-2


def test_interactive_mode_on_a_terminal_keeps_the_conversation(setup):
    ckpt, _, image = setup
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "raytune_minicpmv.cli", "chat", "--model", str(ckpt), "--image",
                             image, "--max-new-tokens", "5"], stdin=slave, stdout=slave, stderr=subprocess.PIPE,
                            env=ENV)
    os.close(slave)
    out = _read_until(master, proc, "you> ")
    os.write(master, b"What colour is it?\n")
    out += _read_until(master, proc, "you> ")
    os.write(master, b"And the shape?\n")
    out += _read_until(master, proc, "you> ")
    os.write(master, b"\n")
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-3000:]
    os.close(master)
    session = ChatSession(str(ckpt), None, (image,), SETTINGS, device="cpu")
    first, second = session.ask("What colour is it?"), session.ask("And the shape?")
    text = out.replace("\r\n", "\n")
    assert first != second and f"model> {first}" in text and f"model> {second}" in text  # the same text streamed
    assert text.count("you> ") == 3


def _read_until(fd, proc, marker: str, timeout: float = 240.0) -> str:
    buf, end = b"", time.time() + timeout
    while not buf.decode(errors="replace").endswith(marker):
        assert proc.poll() is None, (buf, proc.stderr.read())
        assert time.time() < end, buf
        if select.select([fd], [], [], 1.0)[0]:
            buf += os.read(fd, 4096)
    return buf.decode()


def test_missing_inputs_are_one_line_errors(setup, tmp_path, capsys):
    from raytune_minicpmv.cli import main

    ckpt, _, _ = setup
    assert main(["chat", "--model", str(ckpt), "--image", str(tmp_path / "nope.png"), "--adapter",
                 str(tmp_path / "none"), "Q?"]) == 2
    err = capsys.readouterr().err
    assert f"--image {tmp_path / 'nope.png'}: no such file" in err and f"--adapter {tmp_path / 'none'}: no such" in err
    assert main(["chat", "--model", str(tmp_path), "Q?"]) == 2
    assert "holds no weights" in capsys.readouterr().err
