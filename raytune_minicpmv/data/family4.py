"""MiniCPM-V 4.6 / 4.7 records -> processor outputs + assistant-only labels, with image-aware truncation (no Ray).

    proc = load_processor4("ckpt_dir", downsample_mode="16x", max_slice_nums=9)   # transformers' own processor
    s = encode_record4(record, [load_rgb(p) for p in record.images.values()], proc, max_length=2048)
    s.input_ids, s.labels, s.pixel_values, s.target_sizes, s.mm_token_type_ids     # what the row stores

How (every image- and token-level step is transformers' processor; we only choose what to feed it and label it):
1. Messages become chat-template messages: a message with image tags becomes a list of content parts
   (``{"type": "image"}`` at each tag, ``{"type": "text"}`` for the stripped text between tags; a single image
   without a tag goes first in the first user turn), as a user would pass them to `processor.apply_chat_template`.
   `system` becomes a system message. Messages without images stay strings.
2. The conversation is rendered with the checkpoint's own chat template (`add_generation_prompt=False`), so the
   thinking / non-thinking prefix is whatever the model's template writes (Qwen3.5 style: an empty
   ``<think>\\n\\n</think>\\n\\n`` before the last answer).
3. `processor(text=[rendered], images=...)` expands each ``<|image_pad|>`` into the image's placeholder, slices and
   packs the pixels, and tokenizes (with `return_offsets_mapping`: each token's characters in the expanded text).
4. Trainable = tokens that start inside an assistant answer as written (or, when the record wrote a think block
   that the template re-formats, the whole turn body) plus its ``<|im_end|>``; what the template inserts (header,
   empty think block) is context. Labels are pre-shifted: ``labels[t] = input_ids[t+1]`` when t+1 is trainable.
5. Each image's token span is parsed from its markers: an image is [``<image_id>``k``</image_id>``] ``<image>``
   pads ``</image>``, then the ``<slice>`` pads ``</slice>`` crops of its grid, whose rows are joined by a newline
   token. A newline separates rows of ONE image and never starts another: an image starts only at an ``<image>``
   token (splitting on "\\n" mistakes rows for images, ms-swift #9364). Every crop's pad count is checked against
   `target_sizes` (h*w / 16 or / 4), and the crops must add up to the processor's. Works with transformers
   versions whose processor cannot return replacement offsets.
6. Truncation as for 2.6 (templates.finish): never inside an image span; images after the cut are dropped with
   their crops (`target_sizes` rows and pixel columns); labels computed before the cut.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .records import IMAGE_TAG, MULTI_TAG_RE, BadRecord, Record
from .templates import control_tokens

END = "<|im_end|>"
ASSISTANT_HEADER = "<|im_start|>assistant"


@dataclass
class Encoded4:
    input_ids: np.ndarray  # int32[L]
    labels: np.ndarray  # int32[L], pre-shifted, -100 outside assistant answers
    pixel_values: np.ndarray  # float32[3, patch, N] packed crops of the kept images (N = 0 without images)
    target_sizes: np.ndarray  # int32[n_crops, 2]: (H/patch, W/patch) per crop, processor order
    image_bound: np.ndarray  # int64[n_crops, 2]: [start, end) of each crop's <|image_pad|> run
    crops_per_image: list  # of the kept images
    mm_token_type_ids: Optional[np.ndarray]  # int32[L] when the processor returns it (4.7), else None
    image_tokens: int  # tokens of the kept images' placeholders


class Processor4Info:
    """A loaded processor plus what the data stage needs from it (ids, control tokens, token divisor)."""

    def __init__(self, proc):
        self.proc = proc
        tok = proc.tokenizer
        self.tokenizer = tok
        self.control = control_tokens(tok)
        ids = tok.convert_tokens_to_ids
        self.pad, self.image_start, self.image_end = proc.image_token_id, ids(proc.image_start_token), ids(
            proc.image_end_token)
        self.slice_start, self.slice_end = ids(proc.slice_start_token), ids(proc.slice_end_token)
        self.id_start, self.id_end = ids(proc.image_id_start_token), ids(proc.image_id_end_token)
        newline = tok.encode("\n", add_special_tokens=False)
        self.newline = newline[0] if len(newline) == 1 else -1  # the separator between a grid's rows
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.patch_size = int(proc.image_processor.patch_size)

    @property
    def divisor(self) -> int:  # visual tokens per crop = patches / divisor (processor: 4 for "4x", else 16)
        return 4 if self.proc.image_processor.downsample_mode == "4x" else 16


def chat_messages(record: Record) -> list[dict]:
    """The record as chat-template messages (image tags -> {"type": "image"} parts, in text order)."""
    tags = set(record.images)
    single = IMAGE_TAG in tags
    pattern = re.compile(re.escape(IMAGE_TAG)) if single else MULTI_TAG_RE
    out = [{"role": "system", "content": record.system}] if record.system is not None else []
    for i, m in enumerate(record.conversations):
        content = m["content"]
        if i == 0 and single and IMAGE_TAG not in content:
            content = IMAGE_TAG + "\n" + content  # a single image without a tag goes first
        if not tags or not pattern.search(content):
            out.append({"role": m["role"], "content": content})
            continue
        parts = []
        for piece in re.split(f"({pattern.pattern})", content):
            if piece in tags:
                parts.append({"type": "image"})
            elif piece.strip():
                parts.append({"type": "text", "text": piece.strip()})
        out.append({"role": m["role"], "content": parts})
    return out


def assistant_spans(text: str, messages: list[dict]) -> list[tuple[int, int]]:
    """[start, end) character spans of the trained text of each assistant turn in the rendered conversation.

    The k-th assistant message is the k-th ``<|im_start|>assistant`` header (records cannot contain ChatML markers,
    records.RESERVED); its body runs from the header's newline to its ``<|im_end|>`` (included). The answer as
    written ends right before ``<|im_end|>``: that suffix is trained, whatever the template put before it (the
    empty think block). A record that wrote ``</think>`` may be re-formatted by the template (reasoning moved into
    the template's own think block, or dropped from an earlier turn): then the whole body is the record's text.
    """
    spans, cursor = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        head = text.find(ASSISTANT_HEADER, cursor)
        body = text.find("\n", head) + 1 if head >= 0 else -1
        stop = text.find(END, body) if body > 0 else -1
        if stop < 0:
            raise ValueError("the chat template does not render assistant turns as ChatML "
                             f"('{ASSISTANT_HEADER}\\n' ... '{END}'); this is not a MiniCPM-V 4.6/4.7 template")
        content = m["content"] if isinstance(m["content"], str) else "".join(
            p.get("text", "") for p in m["content"])
        for answer in (content, content.strip()):
            if text[body:stop].endswith(answer):
                spans.append((stop - len(answer), stop + len(END)))
                break
        else:
            if "</think>" not in content:
                raise ValueError("the chat template does not render the assistant content verbatim before "
                                 f"{END}; cannot tell which tokens are the answer")
            spans.append((body, stop + len(END)))
        cursor = stop + len(END)
    return spans


def encode_record4(record: Record, images: list, info: Processor4Info, max_length: int) -> Encoded4:
    """One record through the processor, labelled and truncated (raises BadRecord when nothing is trainable)."""
    messages = chat_messages(record)
    text = info.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    spans = assistant_spans(text, messages)
    out = info.proc(text=[text], images=images or None, padding=False, return_tensors="np",
                    return_offsets_mapping=True)
    ids = np.asarray(out["input_ids"][0], dtype=np.int64)
    offsets = np.asarray(out["offset_mapping"][0], dtype=np.int64).reshape(-1, 2)
    starts = offsets[:, 0]
    target_sizes = np.asarray(out["target_sizes"], dtype=np.int32).reshape(-1, 2) if images else np.zeros(
        (0, 2), np.int32)
    image_spans, crops, bounds = _image_structure(ids, target_sizes, info)
    # each image's <|image_pad|> in the rendered text (records cannot contain one: a control token) and the
    # characters its expansion took in the processor's text
    pad = info.proc.image_token
    at = [m.start() for m in re.finditer(re.escape(pad), text)]
    if len(at) != len(images) or len(image_spans) != len(images):
        raise ValueError(f"{len(images)} images, but {len(at)} placeholders in the rendered text and "
                         f"{len(image_spans)} image placeholders in the tokens")
    repl = [{"span": (p, p + len(pad)), "new_span": (int(offsets[s][0]), int(offsets[e - 1][1]))}
            for p, (s, e) in zip(at, image_spans)]
    trainable = np.zeros(len(ids), dtype=bool)
    for s, e in spans:  # rendered-text spans -> expanded-text spans (shifted by the replacements before them)
        s2, e2 = _expanded(s, repl), _expanded(e, repl)
        trainable |= (starts >= s2) & (starts < e2)
    labels = np.full(len(ids), -100, dtype=np.int64)
    labels[:-1] = np.where(trainable[1:], ids[1:], -100)
    mm = np.asarray(out["mm_token_type_ids"][0], dtype=np.int32) if "mm_token_type_ids" in out else None
    pixels = np.asarray(out["pixel_values"][0], dtype=np.float32) if images else np.zeros(
        (3, info.patch_size, 0), np.float32)
    return _truncate(record, ids, labels, mm, pixels, target_sizes, bounds, crops, image_spans, max_length)


def check_control_tokens4(record: Record, info: Processor4Info) -> None:
    """BadRecord(reserved_marker) for a special token of the 4.x tokenizer in the record's text."""
    fields = ([("'system'", record.system)] if record.system else []) + [
        (f"conversations[{i}]", m["content"]) for i, m in enumerate(record.conversations)]
    for name, text in fields:
        for token in info.control:
            if token in text:
                raise BadRecord(record.source, repr(record.id), "reserved_marker",
                                f"{name} contains {token!r}, a special token of the model's tokenizer")


def _expanded(pos: int, repl: list[dict]) -> int:
    shift = 0
    for r in repl:
        if r["span"][1] <= pos:
            shift += (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0])
    return pos + shift


def _image_structure(ids: np.ndarray, target_sizes: np.ndarray, info: Processor4Info):
    """[start, end) token span of each image's placeholder, its crop count and each crop's pad span (see 5.)."""
    image_spans, crops, bounds = [], [], []
    c, n = 0, len(ids)

    def crop(o: int, close: int) -> int:  # one crop: opener at o, its pads, closer; returns the index after it
        nonlocal c
        e = o + 1
        while e < n and ids[e] == info.pad:
            e += 1
        if e >= n or ids[e] != close or c >= len(target_sizes):
            raise ValueError(f"crop {c}: its placeholder is malformed (no closing marker after the pad tokens)")
        h, w = target_sizes[c]
        if e - o - 1 != h * w // info.divisor:
            raise ValueError(f"crop {c} has {e - o - 1} pad tokens, its target size {h}x{w} needs "
                             f"{h * w // info.divisor}")
        bounds.append((o + 1, e))
        c += 1
        return e + 1

    for s in np.flatnonzero(ids == info.image_start):
        start = int(s)
        if start >= 2 and ids[start - 1] == info.id_end:  # <image_id>k</image_id> belongs to the image
            k = start - 2
            while k > 0 and ids[k] != info.id_start and start - k < 8:
                k -= 1
            start = k if ids[k] == info.id_start else start
        e, first = crop(int(s), info.image_end), c - 1
        while True:  # the grid's slices: <slice>..</slice> directly, or after the newline between two rows
            if e < n and ids[e] == info.slice_start:
                e = crop(e, info.slice_end)
            elif e + 1 < n and ids[e] == info.newline and ids[e + 1] == info.slice_start and c - 1 > first:
                e = crop(e + 1, info.slice_end)
            else:
                break
        image_spans.append((start, e))
        crops.append(c - first)
    if c != len(target_sizes):
        raise ValueError(f"the placeholders hold {c} crops but the processor returned {len(target_sizes)}")
    return image_spans, crops, np.asarray(bounds, dtype=np.int64).reshape(-1, 2)


def _truncate(record, ids, labels, mm, pixels, target_sizes, bounds, crops, image_spans, max_length) -> Encoded4:
    all_image_tokens = image_tokens = sum(e - s for s, e in image_spans)
    kept = len(crops)
    if len(ids) > max_length:
        cut = max_length
        for k, (s, e) in enumerate(image_spans):
            if s < cut < e or s >= cut:  # never cut inside a placeholder; drop images from here on
                cut, kept = min(cut, s), k
                break
        ids, labels = ids[:cut], labels[:cut]  # labels shifted before the cut: the last kept token keeps its target
        mm = None if mm is None else mm[:cut]
        n_crops = sum(crops[:kept])
        columns = int(sum(int(h) * int(w) for h, w in target_sizes[:n_crops])) * pixels.shape[1]
        pixels, target_sizes, bounds = pixels[:, :, :columns], target_sizes[:n_crops], bounds[:n_crops]
        image_tokens = sum(e - s for s, e in image_spans[:kept])
    if not np.any(labels != -100):
        if all_image_tokens > max_length:
            raise BadRecord(record.source, repr(record.id), "image_tokens_too_long",
                            f"the image placeholders alone take {all_image_tokens} tokens > data.model_max_length="
                            f"{max_length} and no assistant token comes before the first that does not fit; lower "
                            "data.max_slice_nums, use model.downsample_mode=16x or raise model_max_length")
        raise BadRecord(record.source, repr(record.id), "no_trainable_tokens",
                        f"no assistant token within the first {max_length} tokens (data.model_max_length)")
    return Encoded4(ids.astype(np.int32), labels.astype(np.int32), np.ascontiguousarray(pixels), target_sizes,
                    bounds, list(crops[:kept]), mm, image_tokens)


@dataclass(frozen=True)
class Spec4:
    """The model side of a 4.6/4.7 data stage (what `model_side` returns for these families; in the report)."""

    family: str  # minicpmv4_6 | minicpmv4_7
    model_path: str  # the checkpoint: its processor/preprocessor config and chat template
    downsample_mode: Optional[str] = "16x"  # model.downsample_mode, passed to the processor (None: checkpoint's)
    max_slice_nums: Optional[int] = 9  # data.max_slice_nums, overrides the checkpoint's (None: checkpoint's)
    patch_size: int = 14

    def load(self, tokenizer_path=None) -> Processor4Info:
        from ..models.processor4 import load_processor4

        tok = None if tokenizer_path in (None, self.model_path) else tokenizer_path
        return Processor4Info(load_processor4(self.model_path, self.family, self.downsample_mode,
                                              self.max_slice_nums, tokenizer_path=tok))
