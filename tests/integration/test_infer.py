"""Inference on a local Ray (CPU): `predict` as Ray Data map_batches over 2 model actors (outputs equal in-process
greedy generation; a rerun after a crash generates only what is missing), and generation metrics inside a tiny Tune
run (2 Train workers, ZeRO-3: synced generation), reported next to eval loss and selectable as tune.metric."""
import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from raytune_minicpmv.demo import prepare_demo_inputs

    out = tmp_path_factory.mktemp("infer")
    return out, prepare_demo_inputs(out)


def _cfg(inputs, *overrides):
    from raytune_minicpmv.config import load_config
    from raytune_minicpmv.demo import DEMO_CONFIG

    out, paths = inputs
    return load_config(DEMO_CONFIG, [f"{k}={v}" for k, v in paths.items()] + list(overrides))


def test_predict_on_two_actors_matches_in_process_generation_and_reruns_safely(ray_session, inputs):
    from raytune_minicpmv.data.records import read_raw_records
    from raytune_minicpmv.infer import (GenerationSettings, decode, generate, load_for_inference, prompt_batch,
                                        prompt_of, prompt_rows, stop_token_ids, table_rows)
    from raytune_minicpmv.infer.predict import run_predict

    out, paths = inputs
    cfg = _cfg(inputs, "generate.max_new_tokens=4", "generate.batch_size=2", "generate.num_cpus_per_actor=0.5")
    # 4 records: two ask a question (no answer), two keep their answer as the reference; one image is missing
    raws = list(read_raw_records(paths["data.eval_path"]))[:4]
    records = [json.loads(r.text) for r in raws]
    for r in records[:2]:
        r["conversations"] = r["conversations"][:-1]
    bad = {"id": "bad-1", "image": "missing.png", "conversations": [{"role": "user", "content": "?"}]}
    data = Path(paths["data.eval_path"]).parent / "records.json"  # relative image paths resolve there
    data.write_text(json.dumps(records + [bad]))
    preds = out / "preds.jsonl"
    with pytest.raises(Exception, match="bad-1.*image_missing"):  # data.on_bad_record=error: nothing generated
        run_predict(cfg, paths["model.path"], str(data), str(preds), actors=2)
    assert not preds.exists()

    from raytune_minicpmv.config import replace
    cfg = replace(cfg, data={"on_bad_record": "skip"})
    summary = run_predict(cfg, paths["model.path"], str(data), str(preds), actors=2)
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert [x["id"] for x in lines] == [r["id"] for r in records] + ["bad-1"]
    assert (summary["generated"], summary["errors"]) == (4, 1), summary
    assert 1 <= summary["actors"] <= 2, summary  # a pool of 2 (the second may still be loading when work runs out)
    assert lines[-1]["error"].startswith("image_missing")
    assert "reference" not in lines[0] and lines[2]["reference"] == records[2]["conversations"][-1]["content"]

    model, tok, spec = load_for_inference(paths["model.path"], device="cpu", max_slice_nums=cfg.data.max_slice_nums)
    rows, has = prompt_rows([r for r in read_raw_records(data)][:4], spec, tok, cfg.data.model_max_length)
    prompts = [prompt_of(r, h) for r, h in zip(table_rows(rows), has)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actors (num_cpus_per_actor 0.5): the same fp32 reduction order
    try:
        new = [generate(model, prompt_batch(prompts[i:i + 2]), GenerationSettings(max_new_tokens=4),
                        stop_token_ids(tok.tokenizer)) for i in (0, 2)]  # the actors' batches of 2
    finally:
        torch.set_num_threads(threads)
    new = new[0] + new[1]
    assert [x["output"] for x in lines[:4]] == [decode(tok.tokenizer, n) for n in new]

    # a crash after two records: the final file is gone, the partial file holds two lines (one torn)
    os.replace(preds, str(preds) + ".partial")
    kept = lines[:2]
    Path(str(preds) + ".partial").write_text("".join(json.dumps(x) + "\n" for x in kept) + '{"id": "torn')
    again = run_predict(cfg, paths["model.path"], str(data), str(preds), actors=2)
    assert again["already_done"] == 2 and again["generated"] == 2
    assert [json.loads(x) for x in preds.read_text().splitlines()] == lines
    assert not Path(str(preds) + ".partial").exists()
    assert run_predict(cfg, paths["model.path"], str(data), str(preds))["generated"] == 0  # all done: no Ray work


@pytest.mark.long  # ~100-170 s on 2 cores: a Train worker group of 2 under ZeRO-3 inside a Tune trial
def test_generation_metrics_in_a_tiny_tune_run(ray_session, inputs):
    from raytune_minicpmv.tune.search import run_tune

    out, paths = inputs
    cfg = _cfg(inputs, "run.name=gen", "train.max_steps=1", "optim.warmup_steps=0", "train.eval_steps=1",
               "train.logging_steps=1", "train.eval_max_batches=1", "train.save_steps=1", "tune.search.lr=[1.0e-3]",
               "tune.search.lr_sampler=grid", "tune.num_samples=1", "tune.scheduler=none", "merge.enabled=false",
               "eval.generation_metrics=[exact_match, token_f1, tests.integration.infer_user_metric:reference_words]",
               "eval.generation_max_samples=6", "eval.generation_max_new_tokens=3", "eval.generation_batch_size=2",
               "tune.metric=eval_token_f1", "tune.mode=max")
    summary = run_tune(cfg)
    results = [json.loads(line) for p in Path(summary["experiment"]).glob("*/result.json")
               for line in p.read_text().splitlines() if line.strip()]
    assert [int(r["step"]) for r in results] == [1]
    # the references the workers cut from the preprocessed eval rows: every eval record's last answer, 6 of 6
    records = json.loads(Path(paths["data.eval_path"]).read_text())
    words = [len(r["conversations"][-1]["content"].split()) for r in records]
    for r in results:
        assert "eval_loss" in r and 0.0 <= r["eval_exact_match"] <= r["eval_token_f1"] <= 1.0, r
        assert r["eval_reference_words"] == pytest.approx(sum(words) / len(words))
    assert summary["best_metric"] == pytest.approx(max(r["eval_token_f1"] for r in results))
