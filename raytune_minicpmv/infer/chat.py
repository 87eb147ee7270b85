"""`raytune-minicpmv chat`: ask a (fine-tuned) model about images, answers streamed token by token (no Ray).

    session = ChatSession("ckpt_dir", adapter="runs/x/checkpoint_step_0000100", images=["cat.jpg"])
    answer = session.ask("What is in the picture?", stream=sys.stdout)   # printed as it is generated
    session.ask("And its colour?")                                         # multi-turn: history is kept

The question becomes a fine-tune format record (the images in the first user turn) and goes through the training
preprocessing (infer.prompts): the same template, slicing, placeholders and `data.*` settings as the training rows
(4.6 / 4.7: the 4.x rows path with the checkpoint's processor and chat template, infer.prompts4).
"""
from __future__ import annotations

import sys
from typing import Optional, TextIO

from .generation import GenerationSettings, decode, generate, load_for_inference, stop_token_ids, to_device
from .prompts import chat_record, prompt_batch, prompt_of, prompt_rows, table_rows


class ChatSession:
    def __init__(self, model_dir: str, adapter: Optional[str] = None, images: tuple[str, ...] = (),
                 settings: GenerationSettings = GenerationSettings(), system: Optional[str] = None,
                 max_length: int = 8192, llm_type: Optional[str] = None, max_slice_nums: Optional[int] = None,
                 dtype=None, device: Optional[str] = None, downsample_mode: Optional[str] = None):
        self.model, self.tok, self.spec = load_for_inference(model_dir, adapter, dtype=dtype, device=device,
                                                             llm_type=llm_type, max_slice_nums=max_slice_nums,
                                                             downsample_mode=downsample_mode)
        self.device = next(self.model.parameters()).device
        self.images, self.settings, self.system, self.max_length = list(images), settings, system, max_length
        self.stops = stop_token_ids(self.tok.tokenizer)
        self.history: list[tuple[str, str]] = []

    def ask(self, question: str, stream: Optional[TextIO] = None) -> str:
        """The answer to `question` after the earlier turns; streamed to `stream` (a text file) when given."""
        raw = chat_record(self.images, question, self.history, self.system)
        rows, has = prompt_rows([raw], self.spec, self.tok, self.max_length)  # BadRecord: unusable image or text
        prompt = prompt_of(table_rows(rows, self.spec.patch_size)[0], has[0], self.spec.patch_size)
        streamer = _Streamer(self.tok.tokenizer, stream) if stream is not None else None
        batch = prompt_batch([prompt], downsample_mode=getattr(self.spec, "downsample_mode", None))  # 4.x: Spec4
        new = generate(self.model, to_device(batch, self.device), self.settings, self.stops, streamer=streamer)[0]
        answer = decode(self.tok.tokenizer, new)
        self.history.append((question, answer))
        return answer


class _Streamer:
    """transformers' TextStreamer, writing to a chosen text stream (it prints to stdout)."""

    def __new__(cls, tokenizer, stream: TextIO):
        from transformers import TextStreamer

        class To(TextStreamer):
            started = False

            def on_finalized_text(self, text: str, stream_end: bool = False):
                if not self.started:  # the answer's leading space (a tokenizer artefact) is not printed
                    text = text.lstrip()
                    self.started = bool(text)
                stream.write(text + ("\n" if stream_end else ""))
                stream.flush()

        return To(tokenizer, skip_prompt=True, skip_special_tokens=True)


def run_chat(session: ChatSession, question: Optional[str], stdin: Optional[TextIO] = None,
             stdout: Optional[TextIO] = None) -> int:
    """One question (given, or read from a non-terminal stdin), or an interactive loop on a terminal.
    The streams default to sys.stdin / sys.stdout at call time (not at import: a redirected stdout is honoured)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if question is None and not stdin.isatty():
        question = stdin.read().strip()
        if not question:
            raise ValueError("chat: no question (give one as an argument, pipe it on stdin, or run on a terminal "
                             "for the interactive mode)")
    if question is not None:
        session.ask(question, stream=stdout)
        return 0
    stdout.write("interactive chat: empty line or Ctrl-D ends it; /reset forgets the conversation\n")
    while True:
        stdout.write("you> ")  # on stdout: input()'s own prompt goes to stderr when both ends are terminals
        stdout.flush()
        try:
            line = input().strip()
        except EOFError:
            stdout.write("\n")
            return 0
        if not line:
            return 0
        if line == "/reset":
            session.history.clear()
            continue
        stdout.write("model> ")
        session.ask(line, stream=stdout)
