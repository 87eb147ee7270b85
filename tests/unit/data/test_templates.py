"""Placeholders, chat templates, pre-shifted assistant-only labels, image bounds and truncation per llm_type.
Uses the real MiniCPM-V 2.6 tokenizer (tests/assets) for real ids and the tiny tokenizer for llama3/minicpm."""
import json
from pathlib import Path

import numpy as np
import pytest

from raytune_minicpmv.data.records import BadRecord, Record
from raytune_minicpmv.data.slicing import plan_slices
from raytune_minicpmv.data.templates import (ModelSpec, TokenizerInfo, build_messages, image_placeholder,
                                        model_spec_from_config, tokenize_record)
from raytune_minicpmv.models.tiny_tokenizer import build_tiny_tokenizer

ASSETS = Path(__file__).resolve().parents[2] / "assets"
QWEN = ModelSpec("qwen2")


@pytest.fixture(scope="module")
def real26():
    return TokenizerInfo.load(ASSETS / "minicpmv26_tokenizer")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return {t: TokenizerInfo.load(build_tiny_tokenizer(tmp_path_factory.mktemp(t), t))
            for t in ("llama3", "minicpm")}


def _rec(conv, images=None, system=None):
    return Record("r1", "/data/train.json", conv, images or {}, system)


def _count(tok, text):
    return len(tok.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_placeholder_token_counts_from_the_facts(real26):
    grid = plan_slices((1344, 1344)).grid
    assert _count(real26, image_placeholder(QWEN, grid, 0)) == 665  # 3 (id) + 66 + 9*66 + 2 newlines
    assert _count(real26, image_placeholder(ModelSpec("llama3", query_num=96), grid, 0)) == 984
    assert image_placeholder(QWEN, None, 3) == "<image_id>3</image_id><image>" + "<unk>" * 64 + "</image>"
    assert image_placeholder(ModelSpec("llama3", query_num=96), None, 0).count("<unk>") == 96


def test_model_spec_from_checkpoint_configs():
    s25 = model_spec_from_config(ASSETS / "configs/minicpmv25_config", "llama3")
    assert (s25.query_num, s25.max_slice_nums, s25.scale_resolution, s25.use_image_id) == (96, 9, 448, False)
    s20 = model_spec_from_config(ASSETS / "configs/minicpmv20_config/config.json", "minicpm", max_slice_nums=4)
    assert (s20.query_num, s20.max_slice_nums, s20.patch_size) == (64, 4, 14)
    s26 = model_spec_from_config({"query_num": 64, "slice_config": {"max_slice_nums": 9}, "use_image_id": True},
                                 "qwen")
    assert s26.new_schema and s26.use_image_id and s26.llm_type == "qwen2"


def test_qwen2_chatml_real_ids_labels_and_bounds(real26):
    rec = _rec([{"role": "user", "content": "<image>\nWhat is it?"},
                {"role": "assistant", "content": "A red circle."},
                {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}],
               {"<image>": "/x.png"})
    out = tokenize_record(rec, [plan_slices((1024, 768))], QWEN, real26, 2048)
    ids, labels = out.input_ids.tolist(), out.labels
    t = real26.tokenizer
    assert ids[0] == 151644 and t.decode(ids).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert ids.count(151646) == 1 and ids.count(151656) == 4  # <image> once, <slice> per tile (2x2)
    assert ids.count(151658) == 1  # <image_id>
    # pre-shifted: labels[t] = ids[t+1] exactly on assistant content + <|im_end|>
    trained = [i for i in range(len(ids)) if labels[i] != -100]
    assert all(labels[i] == ids[i + 1] for i in trained)
    assert t.decode([ids[i + 1] for i in trained]) == "A red circle.<|im_end|>Yes.<|im_end|>"
    assert [ids[i + 1] for i in trained].count(151645) == 2
    # one bound per crop, each exactly the 64 <unk> (128244) between its markers, text order
    assert out.image_bound.shape == (5, 2)
    for s, e in out.image_bound:
        assert e - s == 64 and set(ids[s:e]) == {128244}
        assert ids[s - 1] in (151646, 151656) and ids[e] in (151647, 151657)


def test_system_field_replaces_the_default(real26):
    rec = _rec([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], system="Be brief.")
    out = tokenize_record(rec, [], QWEN, real26, 256)
    text = real26.tokenizer.decode(out.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "helpful" not in text
    assert out.image_bound.shape == (0, 2)  # text-only: empty bounds


def test_multi_image_text_order_ids_and_single_newline_join(real26):
    # dict order differs from text order: crops, ids and placeholders follow the TEXT
    from raytune_minicpmv.data.records import RawRecord, parse_record
    raw = RawRecord("/tmp/x.json", 0, json.dumps({"id": "m", "image": {"<image_01>": "/b.png", "<image_00>": "/a.png"},
                    "conversations": [{"role": "user", "content": "<image_00>\n\n<image_01>  Compare."},
                                      {"role": "assistant", "content": "Same."}]}))
    rec = parse_record(raw, check_files=False)
    assert list(rec.images) == ["<image_00>", "<image_01>"]
    msgs = build_messages(rec, ["P0", "P1"])
    assert msgs[0]["content"] == "P0\nP1\nCompare."
    out = tokenize_record(rec, [plan_slices((100, 100)), plan_slices((100, 100))], QWEN, real26, 1024)
    text = real26.tokenizer.decode(out.input_ids)
    assert text.index("<image_id>0</image_id>") < text.index("<image_id>1</image_id>")
    assert "</image>\n<image_id>1</image_id>" in text  # exactly one newline between images


def test_llama3_labels(tiny):
    tok = tiny["llama3"]
    spec = ModelSpec("llama3", query_num=96, use_image_id=False)
    rec = _rec([{"role": "user", "content": "<image> What?"}, {"role": "assistant", "content": "  A dot. "}],
               {"<image>": "/x.png"})
    out = tokenize_record(rec, [plan_slices((1344, 1344))], spec, tok, 4096)
    t = tok.tokenizer
    ids = out.input_ids.tolist()
    assert t.decode(ids).startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>")
    trained = [i for i in range(len(ids)) if out.labels[i] != -100]
    assert t.decode([ids[i + 1] for i in trained]) == "A dot.<|eot_id|>"  # trimmed content + eot
    assert out.image_bound.shape == (10, 2) and all(e - s == 96 for s, e in out.image_bound)


def test_minicpm_labels_learn_eos_after_each_assistant_turn(tiny):
    tok = tiny["minicpm"]
    spec = ModelSpec("minicpm", use_image_id=False)
    rec = _rec([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}])
    out = tokenize_record(rec, [], spec, tok, 256)
    t, ids, labels = tok.tokenizer, out.input_ids.tolist(), out.labels.tolist()
    assert t.decode(ids) == "<用户>Q1<AI>A1<用户>Q2<AI>A2</s>" and t.bos_token_id not in ids
    targets = [t.decode([l]) for l in labels if l != -100]
    assert "".join(targets) == "A1</s>A2</s>"  # intermediate turn ends with eos too


def test_truncation_never_cuts_inside_an_image(real26):
    rec = _rec([{"role": "user", "content": "Look " * 100 + "<image_00> and <image_01>"},
                {"role": "assistant", "content": "ok " * 5}],
               {"<image_00>": "/a.png", "<image_01>": "/b.png"})
    plans = [plan_slices((200, 200)), plan_slices((200, 200))]
    full = tokenize_record(rec, plans, QWEN, real26, 4096)
    cut = int(full.image_bound[1][0]) + 10  # inside the second placeholder
    with pytest.raises(BadRecord, match=r"/data/train.json: record 'r1': no_trainable_tokens"):
        tokenize_record(rec, plans, QWEN, real26, cut)
    # the text before the second image survives; the second image is dropped with its crop
    rec2 = _rec([{"role": "user", "content": "<image_00>"}, {"role": "assistant", "content": "first " * 60},
                 {"role": "user", "content": "<image_01>"}, {"role": "assistant", "content": "second"}],
                {"<image_00>": "/a.png", "<image_01>": "/b.png"})
    full2 = tokenize_record(rec2, plans, QWEN, real26, 4096)
    cut2 = int(full2.image_bound[1][0]) + 10
    out = tokenize_record(rec2, plans, QWEN, real26, cut2)
    assert out.kept_images == 1 and out.image_bound.shape == (1, 2)
    assert real26.tokenizer.convert_ids_to_tokens(int(out.input_ids[-1])) != "<unk>"
    assert len(out.input_ids) < cut2 and np.any(out.labels != -100)


def test_image_tokens_alone_too_long(real26):
    rec = _rec([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "ok"}],
               {"<image>": "/a.png"})
    with pytest.raises(BadRecord, match=r"record 'r1': image_tokens_too_long: .*665 tokens > .*=600"):
        tokenize_record(rec, [plan_slices((1344, 1344))], QWEN, real26, 600)


@pytest.mark.parametrize("where", ["text_before_image_2", "inside_image_2"])
@pytest.mark.parametrize("repeat", [8, 40])  # 8: both placeholders (535 tokens) exceed max_length, the first fits
def test_truncation_before_a_later_image_drops_it_with_its_crops(tmp_path, real26, where, repeat):
    # Through preprocess_records: the row keeps image 1 (5 crops), its bounds lie inside the sequence, and image 2's
    # crops are gone from pixels and tgt_sizes as well (len(tgt_sizes) == len(image_bound) == sum(crops_per_image)).
    from PIL import Image

    from raytune_minicpmv.data.records import RawRecord
    from raytune_minicpmv.data.rows import collate_rows, preprocess_records, rows_to_table, table_to_numpy

    Image.new("RGB", (1024, 768), (200, 10, 10)).save(tmp_path / "a.png")  # grid 2x2: 5 crops
    Image.new("RGB", (1000, 500), (10, 10, 200)).save(tmp_path / "b.png")  # grid 2x1: 3 crops
    rec = {"id": "t", "image": {"<image_00>": "a.png", "<image_01>": "b.png"},
           "conversations": [{"role": "user", "content": "<image_00>\nWhat is it?"},
                             {"role": "assistant", "content": "A red square."},
                             {"role": "user", "content": "And this one, described in detail " * repeat + "<image_01>"},
                             {"role": "assistant", "content": "A blue band."}]}
    raw = RawRecord(str(tmp_path / "d.json"), 0, json.dumps(rec))
    (full,) = preprocess_records([raw], QWEN, real26, 4096)
    assert full.crops_per_image == [5, 3] and full.image_bound.shape == (8, 2)
    ids = full.input_ids.tolist()
    image2_start = ids.index(151658, int(full.image_bound[4][1]))  # the <image_id> that opens image 2
    cut = image2_start - 7 if where == "text_before_image_2" else int(full.image_bound[6][0]) + 3
    assert (cut < 535) == (repeat == 8)  # 535 = both images' placeholder tokens
    (row,) = preprocess_records([raw], QWEN, real26, cut)
    assert row.crops_per_image == [5] and len(row.crops) == 5
    assert len(row.tgt_sizes) == len(row.image_bound) == sum(row.crops_per_image) == 5
    assert row.tgt_sizes.tolist() == [[28, 37]] * 5  # image 1's crops (1024x768 -> 518x392), not image 2's
    assert len(row.input_ids) == (cut if where == "text_before_image_2" else image2_start)
    assert row.input_ids.tolist() == ids[:len(row.input_ids)]
    assert np.array_equal(row.image_bound, full.image_bound[:5]) and int(row.image_bound.max()) < len(row.input_ids)
    assert np.all(row.labels[-5:] == -100)  # the cut falls in a user turn: nothing trained there
    batch = collate_rows(table_to_numpy(rows_to_table([row])))
    assert len(batch["pixel_values"][0]) == 5 and batch["tgt_sizes"][0].shape == (5, 2)
    assert batch["image_bound"][0].shape == (5, 2)


def test_what_the_template_inserts_before_the_content_is_not_trained(real26):
    # Thinking-model templates put an empty "<think>\n\n</think>\n\n" before the last answer; the official code
    # skips it (offset 4). We train the content as written plus its end token, so anything the template adds is
    # context, whatever the template. A <think> block written in the content itself is trained as text.
    import copy

    tok = copy.copy(real26)
    tok.tokenizer = copy.deepcopy(real26.tokenizer)
    tok.tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and "
                                   "loop.last %}<think>\n\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n"
                                   "{% endfor %}")
    rec = _rec([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>hm</think>A1"},
                {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}])
    out = tokenize_record(rec, [], QWEN, tok, 256)
    ids = out.input_ids.tolist()
    assert "<think>\n\n</think>\n\nA2" in tok.tokenizer.decode(ids)
    trained = [ids[i + 1] for i in range(len(ids) - 1) if out.labels[i] != -100]
    assert tok.tokenizer.decode(trained) == "<think>hm</think>A1<|im_end|>A2<|im_end|>"


def test_model_spec_defaults_precedence_and_llm_type_checks():
    # Absent keys take the published models' values; slice_config (2.5/2.6) wins over the top level (2.0 layout).
    assert model_spec_from_config({}, "qwen2") == ModelSpec("qwen2", 64, 9, 448, 14, True)
    assert model_spec_from_config({}, "llama3") == ModelSpec("llama3", 64, 9, 448, 14, False)
    top = {"query_num": 32, "max_slice_nums": 4, "scale_resolution": 336, "patch_size": 16, "use_image_id": False}
    assert model_spec_from_config(top, "qwen") == ModelSpec("qwen2", 32, 4, 336, 16, False)
    nested = {**top, "slice_config": {"max_slice_nums": 6, "scale_resolution": 560, "patch_size": 12}}
    assert model_spec_from_config(nested, "qwen2") == ModelSpec("qwen2", 32, 6, 560, 12, False)
    assert model_spec_from_config(nested, "qwen2", max_slice_nums=2).max_slice_nums == 2
    # image ids are a 2.6 (new schema) feature: the old schema never writes them, whatever the config says
    assert model_spec_from_config({"use_image_id": True}, "minicpm").use_image_id is False
    with pytest.raises(ValueError, match=r"llm_type 'qwen3': expected one of minicpm, llama3, qwen2"):
        model_spec_from_config({}, "qwen3")


@pytest.mark.parametrize("schema", ["qwen2", "qwen2_no_id", "llama3"])
def test_image_token_spans_cover_exactly_each_whole_placeholder(real26, tiny, schema):
    # The span of an image is its whole placeholder (id tag, every crop, the old schema's wrapping <slice>): what
    # truncation keeps or drops as one piece and what num_image_tokens counts.
    from raytune_minicpmv.data.templates import find_image_bounds, image_token_spans

    spec = {"qwen2": QWEN, "qwen2_no_id": ModelSpec("qwen2", use_image_id=False),
            "llama3": ModelSpec("llama3", query_num=96)}[schema]  # use_image_id (default True) is 2.6-only
    tok = tiny["llama3"] if schema == "llama3" else real26
    # a 2x2 grid (5 crops), one crop, a 2x1 grid (3 crops)
    plans = [plan_slices((1024, 768)), plan_slices((200, 200)), plan_slices((1000, 500))]
    rec = _rec([{"role": "user", "content": "See <image_00> and <image_01> now."}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "And <image_02>?"}, {"role": "assistant", "content": "ok"}],
               {"<image_00>": "/a.png", "<image_01>": "/b.png", "<image_02>": "/c.png"})
    out = tokenize_record(rec, plans, spec, tok, 8192)
    ids = out.input_ids.astype(np.int64)
    spans = image_token_spans(ids, find_image_bounds(ids, spec, tok), [5, 1, 3], spec, tok)
    placeholders = [image_placeholder(spec, p.grid, k) for k, p in enumerate(plans)]
    assert ("<image_id>" in placeholders[0]) == (schema == "qwen2")
    assert [_count(tok, p) for p in placeholders] == [e - s for s, e in spans]
    assert [tok.tokenizer.decode(ids[s:e].tolist()) for s, e in spans] == placeholders
    assert out.image_tokens == sum(e - s for s, e in spans) and out.kept_images == 3


def test_a_cut_at_a_placeholder_boundary_keeps_or_drops_the_whole_image(real26):
    from raytune_minicpmv.data.templates import find_image_bounds, image_token_spans

    rec = _rec([{"role": "user", "content": "<image_00>"}, {"role": "assistant", "content": "first " * 20},
                {"role": "user", "content": "<image_01>"}, {"role": "assistant", "content": "second"}],
               {"<image_00>": "/a.png", "<image_01>": "/b.png"})
    plans = [plan_slices((200, 200)), plan_slices((200, 200))]
    full = tokenize_record(rec, plans, QWEN, real26, 4096)
    ids = full.input_ids.astype(np.int64)
    (s1, e1), (s2, e2) = image_token_spans(ids, find_image_bounds(ids, QWEN, real26), [1, 1], QWEN, real26)
    at_start = tokenize_record(rec, plans, QWEN, real26, s2)  # the cut falls right before image 2: it is dropped
    assert (at_start.kept_images, len(at_start.input_ids), at_start.image_tokens) == (1, s2, e1 - s1)
    assert at_start.image_bound.tolist() == full.image_bound[:1].tolist()
    at_end = tokenize_record(rec, plans, QWEN, real26, e2)  # right after image 2: it is kept whole
    assert (at_end.kept_images, len(at_end.input_ids), at_end.image_tokens) == (2, e2, e1 - s1 + e2 - s2)
    assert at_end.image_bound.tolist() == full.image_bound.tolist()
    # a sequence of exactly max_length tokens is not truncated
    exact = tokenize_record(rec, plans, QWEN, real26, len(ids))
    assert exact.input_ids.tolist() == full.input_ids.tolist() and exact.labels.tolist() == full.labels.tolist()


def test_image_tokens_too_long_only_when_they_exceed_max_length(real26):
    rec = _rec([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "ok"}],
               {"<image>": "/a.png"})
    plans = [plan_slices((1344, 1344))]  # 665 placeholder tokens
    with pytest.raises(BadRecord, match=r"record 'r1': image_tokens_too_long: the image placeholders alone take 665 "
                                        r"tokens > data.model_max_length=664 and no assistant token"):
        tokenize_record(rec, plans, QWEN, real26, 664)
    with pytest.raises(BadRecord, match=r"/data/train.json: record 'r1': no_trainable_tokens: no assistant token "
                                        r"within the first 665 tokens \(data.model_max_length\)"):
        tokenize_record(rec, plans, QWEN, real26, 665)


def test_tokenizer_info_load_reads_the_marker_ids_and_the_control_tokens():
    from raytune_minicpmv.data.templates import ALLOWED_IN_TEXT

    real26 = TokenizerInfo.load(ASSETS / "minicpmv26_tokenizer")  # loaded here, not by the shared fixture
    t = real26.tokenizer
    ids = [t.convert_tokens_to_ids(m) for m in ("<image>", "</image>", "<slice>", "</slice>", "<image_id>", "<unk>")]
    assert [real26.im_start, real26.im_end, real26.slice_start, real26.slice_end, real26.im_id_start,
            real26.unk] == ids == [151646, 151647, 151656, 151657, 151658, 128244]
    assert real26.eos == t.eos_token_id == 151645  # <|im_end|>
    control = real26.control
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>", "</image>", "<slice>", "</slice>", "<unk>",
            "<|reserved_special_token_0|>"} <= set(control)
    assert not set(ALLOWED_IN_TEXT) & set(control)  # grounding tags and <image> are text the models read
    assert list(control) == sorted(set(control), key=lambda s: (-len(s), s))  # longest first, then by name


def test_a_special_token_in_system_is_a_bad_record(real26):
    from raytune_minicpmv.data.templates import check_control_tokens

    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(BadRecord, match=r"^/data/train.json: record 'r1': reserved_marker: 'system' contains "
                                        r"'<\|reserved_special_token_0\|>', a special token of the model's tokenizer$"):
        check_control_tokens(_rec(conv, system="Say <|reserved_special_token_0|>."), real26)
    check_control_tokens(_rec(conv, system="Be brief."), real26)  # plain text passes


def test_minicpm_system_prefix_and_no_bos_even_from_a_tokenizer_that_adds_one(tiny):
    # MiniCPM-V 2.0's tokenizer has add_bos_token: true; the 2.0 format was trained without bos, so every segment
    # is encoded without special tokens. `system` is an untrained prefix followed by one newline.
    import copy

    from tokenizers import processors

    tok = copy.copy(tiny["minicpm"])
    t = tok.tokenizer = copy.deepcopy(tiny["minicpm"].tokenizer)
    t._tokenizer.post_processor = processors.TemplateProcessing(single=f"{t.bos_token} $A",
                                                                special_tokens=[(t.bos_token, t.bos_token_id)])
    assert t("x")["input_ids"][0] == t.bos_token_id  # this tokenizer adds bos, like the 2.0 one
    rec = _rec([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], system="Be brief.")
    out = tokenize_record(rec, [], ModelSpec("minicpm", use_image_id=False), tok, 256)
    ids = out.input_ids.tolist()
    assert t.decode(ids) == "Be brief.\n<用户>Q<AI>A</s>" and t.bos_token_id not in ids
    assert "".join(t.decode([l]) for l in out.labels.tolist() if l != -100) == "A</s>"


def test_llama3_system_turn_and_bos_when_the_tokenizer_names_none(tiny):
    import copy

    spec = ModelSpec("llama3", query_num=96, use_image_id=False)
    rec = _rec([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], system=" Be brief. ")
    head = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>")
    for bos in ("<|begin_of_text|>", None):  # a tokenizer without bos_token still gets the 2.5 bos
        tok = copy.copy(tiny["llama3"])
        tok.tokenizer = copy.deepcopy(tiny["llama3"].tokenizer)
        tok.tokenizer.bos_token = bos
        out = tokenize_record(rec, [], spec, tok, 256)
        ids = out.input_ids.tolist()
        assert tok.tokenizer.decode(ids).startswith(head)
        assert tok.tokenizer.decode([ids[i + 1] for i in range(len(ids) - 1) if out.labels[i] != -100]) == "A<|eot_id|>"


def test_a_tokenizer_without_the_markers_is_refused_naming_them():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "<image>": 2},
                                                                                 unk_token="<unk>")),
                                    unk_token="<unk>")  # knows <image> only: a text model's tokenizer
    with pytest.raises(ValueError, match=r"^tokenizer lacks the MiniCPM-V marker tokens \['</image>', '<slice>', "
                                         r"'</slice>', '<image_id>'\]$"):
        TokenizerInfo.wrap(plain)


def test_a_single_image_without_a_tag_goes_first_in_the_first_user_turn(real26):
    rec = _rec([{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "A dot."}],
               {"<image>": "/x.png"})
    assert build_messages(rec, ["P"])[0]["content"] == "P\nWhat is it?"
    out = tokenize_record(rec, [plan_slices((100, 100))], QWEN, real26, 512)
    assert "</image>\nWhat is it?<|im_end|>" in real26.tokenizer.decode(out.input_ids.tolist())


def test_a_user_text_equal_to_the_answer_is_not_trained(real26):
    # each content is found after the previous one: the user's "Same." must not be taken for the answer's
    rec = _rec([{"role": "user", "content": "Same."}, {"role": "assistant", "content": "Same."}])
    out = tokenize_record(rec, [], QWEN, real26, 256)
    ids = out.input_ids.tolist()
    assert real26.tokenizer.decode([ids[i + 1] for i in range(len(ids) - 1) if out.labels[i] != -100]) == (
        "Same.<|im_end|>")


def test_malformed_image_spans_are_reported():
    from raytune_minicpmv.data.templates import find_image_bounds, finish

    tok = TokenizerInfo(None, im_start=1, im_end=2, slice_start=3, slice_end=4, im_id_start=5, unk=0, eos=9)
    spec = ModelSpec("qwen2", query_num=4)
    good = np.array([7, 1, 0, 0, 0, 0, 2, 7])
    assert find_image_bounds(good, spec, tok).tolist() == [[2, 6]]
    for bad in (np.array([7, 1, 0, 0, 0, 2, 7]),  # 3 query tokens instead of 4
                np.array([7, 1, 0, 0, 0, 0, 2, 1, 0])):  # a start marker without its end
        with pytest.raises(ValueError, match=r"^image placeholders are malformed in the token sequence \(start/end "
                                             r"markers do not pair up around 4 query tokens\)$"):
            find_image_bounds(bad, spec, tok)
    with pytest.raises(ValueError, match=r"^found 1 image spans for 5 crops$"):  # placeholders and plans disagree
        finish(_rec([]), good, np.ones(len(good), bool), [plan_slices((1024, 768))],
               ModelSpec("qwen2", query_num=4, use_image_id=False), tok, 64)


def test_an_added_special_token_is_a_control_token_even_when_not_listed_as_special(tiny):
    import copy

    from tokenizers import AddedToken

    t = copy.deepcopy(tiny["llama3"].tokenizer)
    t.add_tokens([AddedToken("<|tool_call|>", special=True)])  # special, but not in the special-tokens map
    assert "<|tool_call|>" not in t.all_special_tokens
    assert "<|tool_call|>" in TokenizerInfo.wrap(t).control
