"""Chat templates, image placeholders, assistant-only labels and image bounds per MiniCPM-V version (no Ray).

    spec = model_spec_from_config("ckpt_dir", llm_type="qwen2", max_slice_nums=9)   # or ModelSpec(...)
    tok = TokenizerInfo.load("ckpt_dir")
    sample = tokenize_record(record, [plan_slices(img.size, spec.max_slice_nums) for img in images], spec, tok,
                             max_length=2048)        # -> Tokenized(input_ids, labels, image_bound, kept_images)

How a record becomes tokens:
1. Each image gets a placeholder string built from its slice grid: old schema (2.0/2.5, llm_type minicpm/llama3):
   ``<image><unk>*Q</image>`` + (sliced: ``<slice>`` + rows of that block joined by "\\n" + ``</slice>``); new schema
   (2.6, qwen2): ``<image_id>k</image_id>`` (every image, k = order of appearance, as HF inference does) +
   ``<image><unk>*Q</image>`` + (sliced: rows of ``<slice><unk>*Q</slice>`` joined by "\\n").
2. The tag (`<image>` / `<image_NN>`, or none: the image goes first in the first user turn) is replaced, and
   placeholders and text pieces are joined with exactly one "\\n" (what HF `chat()` feeds the model).
3. The conversation is rendered: qwen2 with the tokenizer's own chat template (ChatML, default system prompt unless
   the record has `system`); llama3 with MiniCPM-Llama3-V 2.5's training template (bos, header, trimmed content,
   `<|eot_id|>`; `system` becomes a system turn); minicpm as ``<用户>``/``<AI>`` segments tokenized one by one
   without bos, eos after the last message (`system` becomes an untrained prefix).
4. Trainable tokens = assistant content + its end token (`<|im_end|>` / `<|eot_id|>` / final eos). Labels are
   pre-shifted: ``labels[t] = input_ids[t+1]`` when token t+1 is trainable, else -100. For minicpm the last token of
   an intermediate assistant turn also learns eos (that format has no end token between turns).
5. ``image_bound`` = the [start, end) span of the Q ``<unk>`` tokens of every crop, in text order.
6. Truncation to `max_length` never cuts inside an image placeholder: the cut moves to the placeholder's start and
   the images after the cut are dropped with their crops (a record is kept as long as an assistant token is left,
   even when its later images could never fit). With no trainable token left it raises `BadRecord`
   (`image_tokens_too_long` when the placeholders alone exceed `max_length`, else `no_trainable_tokens`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .records import IMAGE_TAG, MULTI_TAG_RE, BadRecord, Record
from .slicing import SlicePlan

LLM_TYPES = ("minicpm", "llama3", "qwen2")
_END_MARKER = {"qwen2": "<|im_end|>", "llama3": "<|eot_id|>"}


@dataclass(frozen=True)
class ModelSpec:
    """Model-side constants the data stage needs (from a checkpoint's config.json)."""

    llm_type: str  # minicpm (2.0) | llama3 (2.5) | qwen2 (2.6)
    query_num: int = 64
    max_slice_nums: int = 9
    scale_resolution: int = 448
    patch_size: int = 14
    use_image_id: bool = True  # only used by the new schema

    @property
    def new_schema(self) -> bool:
        return self.llm_type == "qwen2"


def model_spec_from_config(config, llm_type: str, max_slice_nums: Optional[int] = None) -> ModelSpec:
    """Build a ModelSpec from a checkpoint dir, a config.json path or its dict. `max_slice_nums` overrides."""
    if not isinstance(config, dict):
        path = Path(config)
        config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    llm_type = "qwen2" if llm_type == "qwen" else llm_type
    if llm_type not in LLM_TYPES:
        raise ValueError(f"llm_type {llm_type!r}: expected one of {', '.join(LLM_TYPES)}")
    # 2.5/2.6 keep slicing knobs in slice_config; 2.0 has them at the top level.
    sc = config.get("slice_config") or {}
    return ModelSpec(
        llm_type=llm_type,
        query_num=int(config.get("query_num", 64)),
        max_slice_nums=int(max_slice_nums or sc.get("max_slice_nums", config.get("max_slice_nums", 9))),
        scale_resolution=int(sc.get("scale_resolution", config.get("scale_resolution", 448))),
        patch_size=int(sc.get("patch_size", config.get("patch_size", 14))),
        use_image_id=bool(config.get("use_image_id", True)) if llm_type == "qwen2" else False,
    )


@dataclass
class TokenizerInfo:
    """A fast tokenizer plus the ids of the markers the templates use."""

    tokenizer: object
    im_start: int
    im_end: int
    slice_start: int
    slice_end: int
    im_id_start: int
    unk: int
    eos: int
    control: tuple[str, ...] = ()  # special-token strings a record's text must not contain (find_control_token)

    @classmethod
    def load(cls, path) -> "TokenizerInfo":
        from ..models.tokenizer_loading import load_tokenizer  # plain fast class: the official folder never prompts

        return cls.wrap(load_tokenizer(path))

    @classmethod
    def wrap(cls, tok) -> "TokenizerInfo":
        ids = {t: tok.convert_tokens_to_ids(t) for t in
               ("<image>", "</image>", "<slice>", "</slice>", "<image_id>", "<unk>")}
        missing = [t for t, i in ids.items() if i is None or (i == tok.unk_token_id and t != "<unk>")]
        if missing:
            raise ValueError(f"tokenizer lacks the MiniCPM-V marker tokens {missing}")
        return cls(tok, ids["<image>"], ids["</image>"], ids["<slice>"], ids["</slice>"], ids["<image_id>"],
                   ids["<unk>"], tok.eos_token_id, control_tokens(tok))


# Grounding markers are special tokens the models were trained to read and write inside normal text; the tags are
# placed by the records' own rules (records.py). Every other special token in a text would act as a control token.
ALLOWED_IN_TEXT = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>", "</point>", IMAGE_TAG)


def control_tokens(tok) -> tuple[str, ...]:
    """The tokenizer's special added tokens that may not appear in a record's text (longest first)."""
    special = {t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special}
    special |= set(getattr(tok, "all_special_tokens", []))
    return tuple(sorted(special - set(ALLOWED_IN_TEXT), key=lambda t: (-len(t), t)))


def check_control_tokens(record: Record, tok: TokenizerInfo) -> None:
    """Raise BadRecord(reserved_marker) when the record's text holds one of the tokenizer's special tokens.

    records.RESERVED catches the common ones for every model in the driver; this is the exact list of the model's
    tokenizer (e.g. `<|reserved_special_token_0|>` of 2.6, `</s>` of 2.0), checked where the tokenizer is loaded.
    """
    fields = ([("'system'", record.system)] if record.system else []) + [
        (f"conversations[{i}]", m["content"]) for i, m in enumerate(record.conversations)]
    for name, text in fields:
        for token in tok.control:
            if token in text:
                raise BadRecord(record.source, repr(record.id), "reserved_marker",
                                f"{name} contains {token!r}, a special token of the model's tokenizer")


@dataclass
class Tokenized:
    input_ids: np.ndarray  # int32[L]
    labels: np.ndarray  # int32[L]
    image_bound: np.ndarray  # int64[n_crops, 2]
    kept_images: int  # images whose placeholders survived truncation (their crops go with the row)
    image_tokens: int  # tokens taken by the kept placeholders


# --------------------------------------------------------------------------------------------------------------
# Placeholders and messages


def image_placeholder(spec: ModelSpec, grid: Optional[tuple[int, int]], index: int) -> str:
    """The placeholder of one image with slice grid (cols, rows) or None; `index` = order of appearance."""
    unk = "<unk>" * spec.query_num
    whole = f"<image>{unk}</image>"
    if spec.new_schema:
        head = f"<image_id>{index}</image_id>" if spec.use_image_id else ""
        if grid is None:
            return head + whole
        cols, rows = grid
        return head + whole + "\n".join([f"<slice>{unk}</slice>" * cols] * rows)
    if grid is None:
        return whole
    cols, rows = grid
    return whole + "<slice>" + "\n".join([whole * cols] * rows) + "</slice>"


def build_messages(record: Record, placeholders: list[str]) -> list[dict]:
    """Replace image tags by placeholders (tags are in text order, like `placeholders`), one "\\n" between items."""
    by_tag = dict(zip(record.images, placeholders))
    out = []
    for i, m in enumerate(record.conversations):
        content = m["content"]
        if i == 0 and IMAGE_TAG in by_tag and IMAGE_TAG not in content:
            content = IMAGE_TAG + "\n" + content  # a single image without a tag goes first
        pattern = MULTI_TAG_RE if IMAGE_TAG not in by_tag else re.compile(re.escape(IMAGE_TAG))
        if by_tag and pattern.search(content):
            pieces = []
            for part in re.split(f"({pattern.pattern})", content):
                if part in by_tag:
                    pieces.append(by_tag[part])
                elif part.strip():
                    pieces.append(part.strip())
            content = "\n".join(pieces)
        out.append({"role": m["role"], "content": content})
    return out


# --------------------------------------------------------------------------------------------------------------
# Rendering: text + character spans of trainable text (qwen2, llama3), or token segments (minicpm)


def render_text(messages: list[dict], system: Optional[str], spec: ModelSpec, tok: TokenizerInfo
                ) -> tuple[str, list[tuple[int, int]]]:
    """Rendered conversation and the [start, end) character spans of assistant content + end marker."""
    if spec.llm_type == "llama3":
        return _render_llama3(messages, system, tok)
    chat = ([{"role": "system", "content": system}] if system is not None else []) + messages
    text = tok.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
    end = _END_MARKER["qwen2"]
    spans, cursor = [], 0
    for m in chat:  # the template inserts each content verbatim followed by the end marker
        pos = text.find(m["content"] + end, cursor)
        if pos < 0:
            raise ValueError("the tokenizer's chat template does not render contents verbatim followed by "
                             f"{end}; set data.llm_type to match the model")
        cursor = pos + len(m["content"]) + len(end)
        if m["role"] == "assistant":
            spans.append((pos, cursor))
    return text, spans


def _render_llama3(messages, system, tok) -> tuple[str, list[tuple[int, int]]]:
    # MiniCPM-Llama3-V 2.5's training template: bos, then per turn header + trimmed content + <|eot_id|>.
    bos = tok.tokenizer.bos_token or "<|begin_of_text|>"
    chat = ([{"role": "system", "content": system}] if system is not None else []) + messages
    parts, spans, length = [bos], [], len(bos)
    for m in chat:
        header = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        body = m["content"].strip() + "<|eot_id|>"
        if m["role"] == "assistant":
            spans.append((length + len(header), length + len(header) + len(body)))
        parts += [header, body]
        length += len(header) + len(body)
    return "".join(parts), spans


def encode_texts(texts: list[str], tok: TokenizerInfo) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Batch-encode rendered texts (one call to the fast tokenizer) with character offsets."""
    enc = tok.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(enc["input_ids"], enc["offset_mapping"]))


def trainable_from_offsets(offsets, spans: list[tuple[int, int]]) -> np.ndarray:
    """A token is trainable when it starts inside an assistant span.

    Only a leading newline of the content can share a token with the template (Qwen2 merges "\\n\\n"): that token
    starts in the template's "assistant\\n" and is not trained, as in the official code (which trains from the
    second token after "assistant"). Spans end with a special token, so no token crosses their end.
    """
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(off), dtype=bool)
    for s, e in spans:
        mask |= (off[:, 0] >= s) & (off[:, 0] < e)
    return mask


def encode_minicpm(messages: list[dict], system: Optional[str], tok: TokenizerInfo) -> tuple[np.ndarray, np.ndarray]:
    """MiniCPM-V 2.0: <用户>/<AI> prefixes and messages tokenized separately, no bos, eos after the last message."""
    t = tok.tokenizer
    segments: list[tuple[str, bool]] = [(system + "\n", False)] if system else []
    for i, m in enumerate(messages):
        text = m["content"] + (t.eos_token if i == len(messages) - 1 else "")
        segments += [("<用户>" if m["role"] == "user" else "<AI>", False), (text, m["role"] == "assistant")]
    enc = t([s for s, _ in segments], add_special_tokens=False)["input_ids"]
    ids = np.fromiter((i for e in enc for i in e), dtype=np.int64)
    trainable = np.fromiter((flag for e, (_, flag) in zip(enc, segments) for _ in e), dtype=bool)
    return ids, trainable


# --------------------------------------------------------------------------------------------------------------
# Labels, bounds, truncation


def shifted_labels(ids: np.ndarray, trainable: np.ndarray, spec: ModelSpec, eos_id: int) -> np.ndarray:
    labels = np.full(len(ids), -100, dtype=np.int64)
    labels[:-1] = np.where(trainable[1:], ids[1:], -100)
    if spec.llm_type == "minicpm":  # an assistant turn followed by an untrained token learns to end with eos
        ends = np.flatnonzero(trainable[:-1] & ~trainable[1:])
        labels[ends] = eos_id
    return labels


def find_image_bounds(ids: np.ndarray, spec: ModelSpec, tok: TokenizerInfo) -> np.ndarray:
    starts = {tok.im_start} | ({tok.slice_start} if spec.new_schema else set())
    ends = {tok.im_end} | ({tok.slice_end} if spec.new_schema else set())
    s = np.flatnonzero(np.isin(ids, list(starts))) + 1
    e = np.flatnonzero(np.isin(ids, list(ends)))
    if len(s) != len(e) or np.any(e - s != spec.query_num):
        raise ValueError("image placeholders are malformed in the token sequence (start/end markers do not pair "
                         f"up around {spec.query_num} query tokens)")
    return np.stack([s, e], axis=1).astype(np.int64) if len(s) else np.zeros((0, 2), dtype=np.int64)


def image_token_spans(ids: np.ndarray, bounds: np.ndarray, crops_per_image: list[int], spec: ModelSpec,
                      tok: TokenizerInfo) -> list[tuple[int, int]]:
    """[start, end) token span of each image's whole placeholder (id tag + all crops), in text order."""
    spans, c = [], 0
    for n in crops_per_image:
        start, end = int(bounds[c][0]) - 1, int(bounds[c + n - 1][1]) + 1
        if spec.new_schema and spec.use_image_id:
            start = int(np.flatnonzero(ids[:start] == tok.im_id_start)[-1])
        if not spec.new_schema and n > 1:
            end += 1  # the </slice> that wraps an old-schema grid
        spans.append((start, end))
        c += n
    return spans


def finish(record: Record, ids, trainable: np.ndarray, plans: list[SlicePlan], spec: ModelSpec,
           tok: TokenizerInfo, max_length: int) -> Tokenized:
    """From token ids + trainable mask to the truncated, labelled sample (raises BadRecord when unusable)."""
    ids = np.asarray(ids, dtype=np.int64)
    labels = shifted_labels(ids, trainable, spec, tok.eos)
    bounds = find_image_bounds(ids, spec, tok)
    crops = [p.num_crops for p in plans]
    if len(bounds) != sum(crops):
        raise ValueError(f"found {len(bounds)} image spans for {sum(crops)} crops")
    spans = image_token_spans(ids, bounds, crops, spec, tok)
    all_image_tokens = image_tokens = sum(e - s for s, e in spans)
    kept = len(plans)
    if len(ids) > max_length:
        cut = max_length
        for k, (s, e) in enumerate(spans):
            if s < cut < e or s >= cut:  # never cut inside a placeholder; drop images from here on
                cut, kept = min(cut, s), k
                break
        # labels were shifted before the cut: the last kept token still learns the (cut-away) token after it
        ids, labels = ids[:cut], labels[:cut]
        n_crops = sum(crops[:kept])
        bounds, image_tokens = bounds[:n_crops], sum(e - s for s, e in spans[:kept])
    if not np.any(labels != -100):
        if all_image_tokens > max_length:  # the more useful reason: no max_length would fit text after them
            raise BadRecord(record.source, repr(record.id), "image_tokens_too_long",
                            f"the image placeholders alone take {all_image_tokens} tokens > data.model_max_length="
                            f"{max_length} and no assistant token comes before the first that does not fit; lower "
                            "data.max_slice_nums or raise model_max_length")
        raise BadRecord(record.source, repr(record.id), "no_trainable_tokens",
                        f"no assistant token within the first {max_length} tokens (data.model_max_length)")
    return Tokenized(ids.astype(np.int32), labels.astype(np.int32), bounds, kept, image_tokens)


def tokenize_record(record: Record, plans: list[SlicePlan], spec: ModelSpec, tok: TokenizerInfo,
                    max_length: int) -> Tokenized:
    """One record, end to end (the pipeline does the same in batches: render all, encode once, finish each)."""
    check_control_tokens(record, tok)
    messages = build_messages(record, [image_placeholder(spec, p.grid, k) for k, p in enumerate(plans)])
    if spec.llm_type == "minicpm":
        ids, trainable = encode_minicpm(messages, record.system, tok)
    else:
        text, spans = render_text(messages, record.system, spec, tok)
        (ids, offsets), = encode_texts([text], tok)
        trainable = trainable_from_offsets(offsets, spans)
    return finish(record, ids, trainable, plans, spec, tok, max_length)
