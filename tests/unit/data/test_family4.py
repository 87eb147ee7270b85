"""MiniCPM-V 4.6 / 4.7 rows: our preprocessing + collate equal transformers' own processor on the same conversation.

The reference is `MiniCPMV4_6Processor` / `MiniCPMV4_7Processor` (transformers 5.x, PIL backend) called the way a user
calls it at inference: the conversation written by hand as chat messages with {"type": "image"} parts, rendered with
the checkpoint's chat template, then `processor(text=..., images=..., padding_side="right")`.
"""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raytune_minicpmv.data.family4 import Processor4Info
from raytune_minicpmv.data.pipeline import collate
from raytune_minicpmv.data.records import BadRecord, RawRecord
from raytune_minicpmv.data.rows import table_to_numpy
from raytune_minicpmv.data.rows4 import model_inputs4, preprocess_records4, rows_to_table4
from raytune_minicpmv.models.processor4 import load_processor4
from raytune_minicpmv.models.tiny_processor4 import build_tiny_tokenizer4, write_processor_files

SIZES = {"wide": (500, 700), "odd": (37, 1501), "big": (700, 800), "small": (50, 50)}  # (H, W)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam4")
    tok = build_tiny_tokenizer4(root / "tok")
    dirs = {}
    for fam, mode in (("minicpmv4_6", "16x"), ("minicpmv4_7", "16x"), ("minicpmv4_6", "4x")):
        d = write_processor_files(root / f"{fam}_{mode}", fam, downsample_mode=mode, tokenizer=tok)
        (d / "config.json").write_text(json.dumps({"model_type": fam}))
        dirs[fam, mode] = d
    images = {}
    for k, (name, (h, w)) in enumerate(SIZES.items()):
        arr = np.random.RandomState(k).randint(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{name}.png")
        images[name] = Image.open(root / f"{name}.png").convert("RGB")
    return root, dirs, images


def _records(root):
    return [
        {"id": "single", "image": str(root / "wide.png"),
         "conversations": [{"role": "user", "content": "<image>\nWhat is this?"},
                           {"role": "assistant", "content": "A red circle."}]},
        {"id": "multi", "system": "Be brief.",
         "image": {"<image_00>": str(root / "big.png"), "<image_01>": str(root / "odd.png")},
         "conversations": [{"role": "user", "content": "<image_00>\nDescribe."},
                           {"role": "assistant", "content": "A grid."},
                           {"role": "user", "content": "And <image_01> this?"},
                           {"role": "assistant", "content": "<think>\nthin\n</think>\n\nA line."}]},
        {"id": "text", "conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
        {"id": "small", "image": str(root / "small.png"),
         "conversations": [{"role": "user", "content": "Count <image> the dots"},
                           {"role": "assistant", "content": "Two."}]},
    ]


def _by_hand(images):
    """The same four conversations as a user writes them for the processor (and the images in text order)."""
    img, txt = {"type": "image"}, lambda t: {"type": "text", "text": t}
    return [
        ([{"role": "user", "content": [img, txt("What is this?")]},
          {"role": "assistant", "content": "A red circle."}], [images["wide"]]),
        ([{"role": "system", "content": "Be brief."},
          {"role": "user", "content": [img, txt("Describe.")]}, {"role": "assistant", "content": "A grid."},
          {"role": "user", "content": [txt("And"), img, txt("this?")]},
          {"role": "assistant", "content": "<think>\nthin\n</think>\n\nA line."}], [images["big"], images["odd"]]),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], []),
        ([{"role": "user", "content": [txt("Count"), img, txt("the dots")]},
          {"role": "assistant", "content": "Two."}], [images["small"]]),
    ]


def _raws(root, records):
    src = str(root / "train.jsonl")
    return [RawRecord(src, i, json.dumps(r), None) for i, r in enumerate(records)]


_CACHE = {}


def _ours(env, key, records, max_length=8192):
    root, dirs, _ = env
    if key not in _CACHE:
        _CACHE[key] = Processor4Info(load_processor4(dirs[key]))
    info, memo = _CACHE[key], (key, json.dumps(records), max_length)
    if memo not in _CACHE:  # the same rows serve several tests
        _CACHE[memo] = rows_to_table4(preprocess_records4(_raws(root, records), info, key[0], max_length))
    return info, _CACHE[memo]


def _reference(proc, convs):
    texts = [proc.apply_chat_template(m, tokenize=False) for m, _ in convs]
    images = [ims for _, ims in convs]
    kwargs = {"images": images} if any(images) else {}
    return proc(text=texts, padding_side="right", **kwargs)


@pytest.mark.parametrize("key", [("minicpmv4_6", "16x"), ("minicpmv4_7", "16x"), ("minicpmv4_6", "4x")])
def test_batch_equals_processor(env, key):
    root, _, images = env
    info, table = _ours(env, key, _records(root))
    batch = collate(table_to_numpy(table))
    ref = _reference(info.proc, _by_hand(images))
    assert set(model_inputs4(batch)) == set(ref)  # 4.7 adds mm_token_type_ids; nothing else differs
    for name in ref:
        assert batch[name].dtype == ref[name].dtype and torch.equal(batch[name], ref[name]), name
    assert batch["num_images"].tolist() == [1, 2, 0, 1]
    # the big image's grid has several rows ("\n" between them): it is still ONE image with all its crops, as the
    # image processor counts them (splitting on "\n" would make each row an image: ms-swift #9364)
    ip = info.proc.image_processor([images["wide"], images["big"], images["odd"], images["small"]])
    assert ip["grids"][1][0] > 1
    crops = ip["num_patches_per_image"]
    assert table.column("crops_per_image").to_pylist() == [[crops[0]], crops[1:3], [], [crops[3]]]
    divisor = 4 if key[1] == "4x" else 16
    ids, ts = batch["input_ids"], batch["target_sizes"].numpy()
    bounds = [b for row in table.column("image_bound").to_pylist() for b in np.reshape(row, (-1, 2))]
    rows_of_crops = [r for r, n in enumerate([crops[0], crops[1] + crops[2], 0, crops[3]]) for _ in range(n)]
    assert len(bounds) == len(ts) == len(rows_of_crops)
    for (s, e), (h, w), r in zip(bounds, ts, rows_of_crops):
        assert e - s == h * w // divisor and bool((ids[r, s:e] == info.pad).all())


def test_labels_are_the_written_answers(env):
    root, _, _ = env
    info, table = _ours(env, ("minicpmv4_7", "16x"), _records(root))
    tok = info.tokenizer
    trained = []
    for ids, labels in zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist()):
        ids, labels = np.asarray(ids), np.asarray(labels)
        keep = labels != -100
        assert np.array_equal(labels[:-1][keep[:-1]], ids[1:][keep[:-1]])  # pre-shifted: target of position t
        trained.append(tok.decode(labels[keep]))
    # the template's empty think block before the last answer is context; the record's own think block is trained
    assert trained == ["A red circle.<|im_end|>", "A grid.<|im_end|><think>\nthin\n</think>\n\nA line.<|im_end|>",
                       "ok<|im_end|>", "Two.<|im_end|>"]
    first = tok.decode(table.column("input_ids").to_pylist()[0])
    assert first.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nA red circle.<|im_end|>\n")


@pytest.mark.parametrize("family", ["minicpmv4_6", "minicpmv4_7"])
def test_truncation_before_a_later_image(env, family):
    root, dirs, images = env
    record = _records(root)[1]
    info, full = _ours(env, (family, "16x"), _records(root))
    full = full.slice(1, 1)
    ids = np.asarray(full.column("input_ids")[0].as_py())
    second = int(np.flatnonzero(ids == info.tokenizer.convert_tokens_to_ids("<image_id>"))[1])
    _, cut = _ours(env, (family, "16x"), [record], max_length=second + 5)  # inside image 2's placeholder
    row = table_to_numpy(cut)
    assert np.array_equal(row["input_ids"][0], ids[:second])  # the cut moved back to the placeholder's start
    if family == "minicpmv4_7":  # the position inputs are cut with the tokens
        assert np.array_equal(row["mm_token_type_ids"][0], (ids[:second] == info.pad).astype(np.int32))
    assert row["crops_per_image"][0] == full.column("crops_per_image")[0].as_py()[:1] and row["num_images"][0] == 1
    batch = collate(row)
    only_first = info.proc(text=["<|image_pad|>"], images=[images["big"]])  # image 1's pixels, alone
    assert torch.equal(batch["pixel_values"], only_first["pixel_values"])
    assert torch.equal(batch["target_sizes"], only_first["target_sizes"])
    trained = info.tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])
    assert trained == "A grid.<|im_end|>"  # the first answer is kept; the second went with its image


def test_tiny_and_extreme_aspect_images_equal_processor(env, tmp_path):
    root, dirs, _ = env
    sizes = {"dot": (1, 1), "strip": (40, 4000)}  # (H, W): upscaled to one crop; one long crop
    for name, (h, w) in sizes.items():
        Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(tmp_path / f"{name}.png")
    record = {"id": "x", "image": {"<image_00>": str(tmp_path / "dot.png"), "<image_01>": str(tmp_path / "strip.png")},
              "conversations": [{"role": "user", "content": "<image_00><image_01>Which?"},
                                {"role": "assistant", "content": "Both."}]}
    info, table = _ours(env, ("minicpmv4_7", "16x"), [record])
    batch = collate(table_to_numpy(table))
    ims = [Image.open(tmp_path / f"{n}.png").convert("RGB") for n in sizes]
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which?"}]},
            {"role": "assistant", "content": "Both."}]
    ref = _reference(info.proc, [(conv, ims)])
    for name in ref:
        assert torch.equal(batch[name], ref[name]), name


def test_bad_records(env):
    root, _, _ = env
    long_img = _records(root)[0]
    with pytest.raises(BadRecord, match="image_tokens_too_long"):
        _ours(env, ("minicpmv4_6", "16x"), [long_img], max_length=40)
    pad = {"id": "pad", "conversations": [{"role": "user", "content": "a <|image_pad|> b"},
                                          {"role": "assistant", "content": "c"}]}
    with pytest.raises(BadRecord, match="reserved_marker"):
        _ours(env, ("minicpmv4_6", "16x"), [pad])
    # skip mode: a tombstone row in place, the others intact
    info = Processor4Info(load_processor4(env[1]["minicpmv4_6", "16x"]))
    good = _records(root)[2]
    rows = preprocess_records4(_raws(root, [pad, good]), info, "minicpmv4_6", 2048, on_bad_record="skip")
    table = rows_to_table4(rows)
    assert table.column("skip_reason").to_pylist() == ["reserved_marker", ""]
    assert table.column("num_tokens").to_pylist()[0] == 0 and table.column("id").to_pylist() == ["pad", "text"]


def test_rows_survive_parquet_as_uint8(env, tmp_path):
    root, _, images = env
    info, table = _ours(env, ("minicpmv4_7", "16x"), _records(root))
    assert table.column("pixel_dtype").to_pylist() == ["uint8"] * 4  # exact for the 0.5/0.5 normalization
    pq.write_table(table, tmp_path / "rows.parquet")
    back = collate(table_to_numpy(pq.read_table(tmp_path / "rows.parquet")))
    ref = _reference(info.proc, _by_hand(images))
    assert torch.equal(back["pixel_values"], ref["pixel_values"]) and torch.equal(back["input_ids"], ref["input_ids"])


def test_text_only_batch_has_no_pixel_inputs(env):
    root, _, _ = env
    info, table = _ours(env, ("minicpmv4_7", "16x"), [_records(root)[2]])
    batch = collate(table_to_numpy(table))
    ref = _reference(info.proc, [_by_hand({"wide": None, "big": None, "odd": None, "small": None})[2]])
    assert set(model_inputs4(batch)) == set(ref) == {"input_ids", "attention_mask", "mm_token_type_ids"}
    assert torch.equal(batch["input_ids"], ref["input_ids"])


def test_think_block_reformatted_by_the_template_is_trained_as_the_records(env):
    # the template rewrites a written think block (adds its newlines) in the last answer and drops it from earlier
    # ones: the turn's whole body is the record's text, never the template's empty block for unwritten thinking
    record = {"id": "think", "conversations": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>x</think>First."},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "<think>why</think>Second."}]}
    info, table = _ours(env, ("minicpmv4_6", "16x"), [record])
    ids, labels = (np.asarray(table.column(c)[0].as_py()) for c in ("input_ids", "labels"))
    assert info.tokenizer.decode(labels[labels != -100]) == (
        "First.<|im_end|><think>\nwhy\n</think>\n\nSecond.<|im_end|>")
    assert "<think>x" not in info.tokenizer.decode(ids)  # the earlier reasoning is not in the input at all


def test_model_side_and_fingerprint_of_a_46_run(env, tmp_path):
    from raytune_minicpmv.config import config_from_dict
    from raytune_minicpmv.data.family4 import Spec4
    from raytune_minicpmv.data.fingerprint import inputs_fingerprint, stale_reasons
    from raytune_minicpmv.data.pipeline import model_side

    root, dirs, _ = env
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in dirs["minicpmv4_6", "16x"].iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    (tmp_path / "train.json").write_text("[]")
    cfg = config_from_dict({"data": {"train_path": str(tmp_path / "train.json"), "max_slice_nums": 4,
                                     "tokenizer_path": str(root / "tok")},
                            "model": {"path": str(ckpt), "family": "minicpmv4_6", "downsample_mode": "4x"}})
    spec, tok_path = model_side(cfg)
    assert spec == Spec4("minicpmv4_6", str(ckpt), "4x", 4) and tok_path == str(root / "tok")
    before = inputs_fingerprint(cfg.data, spec, tok_path)
    (ckpt / "processor_config.json").write_text((ckpt / "processor_config.json").read_text().replace(
        '"max_slice_nums": 9', '"max_slice_nums": 2'))
    assert stale_reasons(before, inputs_fingerprint(cfg.data, spec, tok_path)) == [
        "tokenizer files changed: model.path/processor_config.json"]


def test_right_padding_leaves_each_rows_logits_unchanged(env, tmp_path):
    """The batch contract's right padding is exact for the hybrid 4.7 model (its Gated-DeltaNet layers carry state
    from token to token; M-RoPE positions come from the ids): a row's logits in the padded batch equal its own."""
    from transformers import MiniCPMV4_7Config, MiniCPMV4_7ForConditionalGeneration

    from raytune_minicpmv.models.tiny_processor4 import structural_token_ids

    Image.fromarray(np.random.RandomState(0).randint(0, 256, (60, 90, 3), dtype=np.uint8)).save(tmp_path / "s.png")
    records = [{"id": "img", "image": str(tmp_path / "s.png"),
                "conversations": [{"role": "user", "content": "<image>\nWhat?"},
                                  {"role": "assistant", "content": "A dot."}]},
               {"id": "txt", "conversations": [{"role": "user", "content": "How many shapes are there?"},
                                               {"role": "assistant", "content": "Three."}]}]
    info, table = _ours(env, ("minicpmv4_7", "16x"), records)
    ids = {k: v for k, v in structural_token_ids(info.tokenizer).items() if k not in ("pad_token_id", "eos_token_id")}
    torch.manual_seed(0)
    cfg = MiniCPMV4_7Config(
        text_config=dict(model_type="qwen3_5_text", vocab_size=len(info.tokenizer), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=32, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
                         linear_value_head_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=14), insert_layer_id=1, **ids)
    model = MiniCPMV4_7ForConditionalGeneration(cfg).eval()
    assert cfg.text_config.layer_types.count("linear_attention") == 3
    with torch.no_grad():
        both = model(**model_inputs4(collate(table_to_numpy(table)))).logits
        for i in range(2):
            alone = model(**model_inputs4(collate(table_to_numpy(table.slice(i, 1))))).logits[0]
            assert torch.allclose(both[i, :len(alone)], alone, atol=1e-5), i
    assert table.column("num_tokens").to_pylist()[0] != table.column("num_tokens").to_pylist()[1]


def test_the_row_code_imports_without_ray():
    """benchmarks/v4_step.py builds 4.x rows on a GPU machine that has no ray: the data package's own names resolve
    lazily, so importing a row module does not import the Ray Data wiring."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import raytune_minicpmv.data.rows4, raytune_minicpmv.data.family4, raytune_minicpmv.data.records\n"
            "print('ray' in sys.modules)\n"
            "from raytune_minicpmv.data import run_preprocess, BadRecord\n"
            "print(run_preprocess.__module__, BadRecord.__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "raytune_minicpmv.data.pipeline", "raytune_minicpmv.data.records"]
