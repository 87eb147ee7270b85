"""The data stage on a real local Ray: run_preprocess -> Parquet + report -> build_dataset(preprocessed) -> collate,
plus skip mode (per-reason counts, the cap) and error mode surfacing a worker-side bad record."""
import json
import os

import numpy as np
import pytest
import ray

from raytune_minicpmv.config import config_from_dict, replace
from raytune_minicpmv.data.pipeline import EmptySplitError, SkipCapError, build_dataset, collate, run_preprocess
from raytune_minicpmv.data.records import BadRecord, read_raw_records
from raytune_minicpmv.data.rows import preprocess_records
from raytune_minicpmv.data.sample_data import write_sample_dataset
from raytune_minicpmv.data.templates import ModelSpec, TokenizerInfo
from raytune_minicpmv.models.tiny_tokenizer import build_tiny_tokenizer
from tests.ray_teardown import shutdown_ray

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_stage")
    ckpt = build_tiny_tokenizer(root / "ckpt")  # the data stage reads only config.json + tokenizer files
    (ckpt / "config.json").write_text(json.dumps({"model_type": "minicpmv", "version": "2.6", "query_num": 64,
                                                  "use_image_id": True, "slice_config": {"max_slice_nums": 9}}))
    return root, ckpt, write_sample_dataset(root / "data"), write_sample_dataset(root / "data", split="eval")


def _cfg(root, ckpt, train, name, model=None, **data):
    return config_from_dict({"run": {"name": name, "storage_path": str(root / "runs")},
                             "data": {"train_path": str(train), "num_cpus_per_task": 0.5, "max_tasks": 2, **data},
                             "model": {"path": str(ckpt), **(model or {})}})


def test_preprocess_writes_parquet_and_report_then_trains_from_it(local_ray, inputs):
    root, ckpt, train, evals = inputs
    cfg = _cfg(root, ckpt, train, "ok", eval_path=str(evals), max_slice_nums=4)
    report = run_preprocess(cfg)
    out = cfg.data_output_path
    assert json.loads(open(os.path.join(out, "report.json")).read())["splits"].keys() == {"train", "eval"}
    tr = report["splits"]["train"]
    assert (tr["records_in"], tr["records_out"], tr["skipped"]) == (20, 20, {})
    assert tr["images"] == 23 and sum(tr["crops_per_image"].values()) == 23
    assert set(tr["crops_per_image"]) > {"1"} and tr["tokens"]["max"] <= cfg.data.model_max_length
    assert report["splits"]["eval"]["records_out"] == 6

    pre = replace(cfg, data={"preprocessed": True})
    ds = build_dataset(pre, "train")
    rows = {r["id"]: r for r in ds.take_all()}
    assert len(rows) == 20
    # identical to the in-process preprocessing of the same records
    spec = ModelSpec("qwen2", max_slice_nums=4)
    direct = preprocess_records(list(read_raw_records(train)), spec, TokenizerInfo.load(ckpt), 2048)
    for d in direct:
        assert np.array_equal(rows[d.id]["input_ids"], d.input_ids)
        assert np.array_equal(rows[d.id]["labels"], d.labels)
    batch = next(iter(ds.iter_torch_batches(batch_size=4, collate_fn=collate)))
    assert batch["input_ids"].shape[0] == 4 and len(batch["pixel_values"]) == 4


def test_skip_mode_counts_reasons_and_enforces_the_cap(local_ray, inputs, tmp_path):
    root, ckpt, train, _ = inputs
    recs = json.loads(train.read_text())
    (tmp_path / "junk.png").write_text("not an image")
    for r in recs:  # absolute paths so the file can live elsewhere
        if isinstance(r.get("image"), str):
            r["image"] = str(train.parent / r["image"])
        elif isinstance(r.get("image"), dict):
            r["image"] = {k: str(train.parent / v) for k, v in r["image"].items()}
    conv = [{"role": "user", "content": "<image>\nx"}, {"role": "assistant", "content": "y"}]
    recs += [{"id": "gone", "image": str(tmp_path / "nope.png"), "conversations": conv},  # driver check
             {"id": "junk", "image": str(tmp_path / "junk.png"), "conversations": conv}]  # worker decode
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))

    cfg = _cfg(root, ckpt, data, "skip", on_bad_record="skip", max_skip_fraction=0.1, max_slice_nums=1)
    s = run_preprocess(cfg)["splits"]["train"]
    assert (s["records_in"], s["records_out"]) == (22, 20)
    assert s["skipped"] == {"image_missing": 1, "image_unreadable": 1}
    assert {(e["record"].strip("'"), e["reason"]) for e in s["skipped_examples"]} == {
        ("gone", "image_missing"), ("junk", "image_unreadable")}
    assert build_dataset(replace(cfg, data={"preprocessed": True})).count() == 20

    capped = _cfg(root, ckpt, data, "capped", on_bad_record="skip", max_skip_fraction=0.05, max_slice_nums=1)
    with pytest.raises(SkipCapError, match=r"2 of 22 records skipped .* > data.max_skip_fraction=0.05"):
        run_preprocess(capped)
    assert not os.path.exists(os.path.join(capped.data_output_path, "report.json"))

    strict = _cfg(root, ckpt, data, "strict", max_slice_nums=1)
    with pytest.raises(Exception, match=r"mixed.jsonl: record 'gone': image_missing"):
        run_preprocess(strict)  # the driver's check lists it before any Ray work
    recs.pop(-2)
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(BadRecord, match=r"mixed.jsonl: record 'junk': image_unreadable"):
        run_preprocess(strict)  # found inside a Ray Data actor, surfaced as itself


def test_a_split_without_usable_records_fails_clearly_and_leaves_a_report(local_ray, inputs, tmp_path):
    root, ckpt, _, _ = inputs
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    cfg = _cfg(root, ckpt, empty, "empty", max_slice_nums=1)
    out = cfg.data_output_path
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "report.json"), "w").write("{}")  # a previous run's: must not vouch for this one
    with pytest.raises(EmptySplitError, match=r"data.train_path: .*empty.json: the train split has no usable record: "
                                              r"the file holds no records"):
        run_preprocess(cfg)
    assert not os.path.exists(os.path.join(out, "report.json"))
    failed = json.loads(open(os.path.join(out, "report.failed.json")).read())
    assert failed["splits"]["train"]["records_in"] == 0 and "no usable record" in failed["error"]

    # every record bad: one at the driver (missing image), one in a Ray Data actor (not an image)
    (tmp_path / "junk.png").write_text("not an image")
    conv = [{"role": "user", "content": "<image>\nx"}, {"role": "assistant", "content": "y"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"id": i, "image": str(tmp_path / p), "conversations": conv}) + "\n"
                           for i, p in (("gone", "nope.png"), ("junk", "junk.png"))))
    cfg = _cfg(root, ckpt, bad, "allbad", on_bad_record="skip", max_skip_fraction=1.0, max_slice_nums=1)
    with pytest.raises(EmptySplitError, match=r"the train split has no usable record: all 2 records are bad "
                                              r"\((image_missing: 1, image_unreadable: 1|image_unreadable: 1, "
                                              r"image_missing: 1)\)"):
        run_preprocess(cfg)
    failed = json.loads(open(os.path.join(cfg.data_output_path, "report.failed.json")).read())
    assert failed["splits"]["train"]["skipped"] == {"image_missing": 1, "image_unreadable": 1}
    assert not os.path.exists(os.path.join(cfg.data_output_path, "train"))  # nothing moved into place


def test_preprocess_minicpmv46_rows_are_the_processors(local_ray, inputs):
    """4.6 through run_preprocess on Ray Data: the Parquet rows equal the in-process processor rows, and
    model.downsample_mode reaches the processor inside the actors."""
    from raytune_minicpmv.data.family4 import Spec4
    from raytune_minicpmv.data.rows4 import preprocess_records4
    from raytune_minicpmv.models.tiny_processor4 import write_processor_files

    root, _, train, _ = inputs
    ckpt = write_processor_files(root / "ckpt46", "minicpmv4_6")  # the data stage reads no weights
    (ckpt / "config.json").write_text(json.dumps({"model_type": "minicpmv4_6"}))
    cfg = _cfg(root, ckpt, train, "v46", model={"family": "minicpmv4_6", "downsample_mode": "4x"}, max_slice_nums=4)
    report = run_preprocess(cfg)
    tr = report["splits"]["train"]
    assert (tr["records_in"], tr["records_out"], tr["skipped"]) == (20, 20, {})
    assert report["model_spec"]["family"] == "minicpmv4_6" and report["model_spec"]["downsample_mode"] == "4x"
    rows = {r["id"]: r for r in build_dataset(replace(cfg, data={"preprocessed": True}), "train").take_all()}
    info = Spec4("minicpmv4_6", str(ckpt), "4x", 4).load()
    for d in preprocess_records4(list(read_raw_records(train)), info, "minicpmv4_6", 2048):
        assert np.array_equal(rows[d.id]["input_ids"], d.input_ids) and rows[d.id]["pixel_values"] == d.pixels
        assert np.array_equal(rows[d.id]["labels"], d.labels) and rows[d.id]["family"] == "minicpmv4_6"
    ds = build_dataset(replace(cfg, data={"preprocessed": True}), "train")
    batch = next(iter(ds.iter_torch_batches(batch_size=4, collate_fn=collate)))
    ts = batch["target_sizes"]
    assert tuple(batch["pixel_values"].shape) == (1, 3, 14, int(ts.prod(1).sum()) * 14)
    assert int((batch["input_ids"] == info.pad).sum()) == int(ts.prod(1).sum()) // 4  # 4x: patches / 4
