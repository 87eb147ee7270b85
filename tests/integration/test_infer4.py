"""Inference for MiniCPM-V 4.6 on a local Ray (CPU): `predict` as Ray Data map_batches over 2 model actors (outputs
equal in-process greedy generation of transformers' class), and generation metrics inside a training run's eval
(2 Train workers, ZeRO-2: 4.x refuses ZeRO-3), reported next to eval_loss.
    flock /tmp/raytest.lock python -m pytest tests/integration/test_infer4.py -q
"""
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from raytune_minicpmv.data.sample_data import write_sample_dataset
    from raytune_minicpmv.models.tiny_v4 import build_tiny_v4

    root = tmp_path_factory.mktemp("infer4")
    ckpt = build_tiny_v4("minicpmv4_6", root / "tiny46", max_slice_nums=2, llm_init_std=0.1)
    path = ckpt / "processor_config.json"  # 112-pixel crops (64 patches): a CPU forward in well under a second
    proc = json.loads(path.read_text())
    proc["image_processor"]["scale_resolution"] = 112
    path.write_text(json.dumps(proc, indent=2))
    return root, {"model.family": "minicpmv4_6", "model.path": str(ckpt), "deepspeed.zero_stage": "2",
                  "data.train_path": str(write_sample_dataset(root / "data", "train")),
                  "data.eval_path": str(write_sample_dataset(root / "data", "eval")),
                  "run.storage_path": str(root / "runs")}


def _cfg(paths, *overrides):
    from raytune_minicpmv.config import load_config

    return load_config(DEMO, [f"{k}={v}" for k, v in paths.items()] + list(overrides))


def test_predict_46_on_two_actors_matches_in_process_generation(ray_session, inputs):
    from raytune_minicpmv.data.records import read_raw_records
    from raytune_minicpmv.infer import (GenerationSettings, decode, generate, load_for_inference, prompt_batch,
                                        prompt_of, prompt_rows, stop_token_ids, table_rows)
    from raytune_minicpmv.infer.predict import run_predict

    root, paths = inputs
    cfg = _cfg(paths, "generate.max_new_tokens=3", "generate.batch_size=2", "generate.num_cpus_per_actor=0.5")
    raws = list(read_raw_records(paths["data.eval_path"]))[:4]
    records = [json.loads(r.text) for r in raws]
    for r in records[:2]:  # two ask a question, two keep their answer as the reference
        r["conversations"] = r["conversations"][:-1]
    data = Path(paths["data.eval_path"]).parent / "records4.json"  # relative image paths resolve there
    data.write_text(json.dumps(records))
    preds = root / "preds.jsonl"
    summary = run_predict(cfg, paths["model.path"], str(data), str(preds), actors=2)
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert [x["id"] for x in lines] == [r["id"] for r in records]
    assert (summary["generated"], summary["errors"]) == (4, 0) and 1 <= summary["actors"] <= 2, summary
    assert "reference" not in lines[0] and lines[2]["reference"] == records[2]["conversations"][-1]["content"]

    model, info, spec = load_for_inference(paths["model.path"], device="cpu", max_slice_nums=cfg.data.max_slice_nums,
                                           downsample_mode=cfg.model.downsample_mode)
    rows, has = prompt_rows(list(read_raw_records(data)), spec, info, cfg.data.model_max_length)
    prompts = [prompt_of(r, h) for r, h in zip(table_rows(rows), has)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actors (num_cpus_per_actor 0.5): the same fp32 reduction order
    try:
        new = [n for i in (0, 2) for n in generate(  # the actors' batches of 2
            model, prompt_batch(prompts[i:i + 2], downsample_mode=spec.downsample_mode),
            GenerationSettings(max_new_tokens=3), stop_token_ids(info.tokenizer))]
    finally:
        torch.set_num_threads(threads)
    assert [x["output"] for x in lines] == [decode(info.tokenizer, n) for n in new]
    assert all(n for n in new)


@pytest.mark.long  # ~65 s on 2 busy cores: a Train worker group of 2 under ZeRO-2, one step, one evaluation
def test_generation_metrics_in_46_training_eval(ray_session, inputs):
    from raytune_minicpmv.train.trainer import run_train

    root, paths = inputs
    cfg = _cfg(paths, "run.name=gen46", "train.max_steps=1", "optim.warmup_steps=0", "train.eval_steps=1",
               "train.logging_steps=1", "train.eval_max_batches=1", "train.save_steps=1", "merge.enabled=false",
               "eval.generation_metrics=[exact_match, token_f1, tests.integration.infer_user_metric:reference_words]",
               "eval.generation_max_samples=6", "eval.generation_max_new_tokens=2", "eval.generation_batch_size=2")
    summary = run_train(cfg)
    assert summary["error"] is None and summary["steps"] == 1, summary
    history = [json.loads(x) for x in Path(summary["metrics_jsonl"]).read_text().splitlines() if x.strip()]
    evals = [h for h in history if "eval_token_f1" in h]
    assert len(evals) == 1 and "eval_loss" in evals[0]
    r = evals[0]
    assert 0.0 <= r["eval_exact_match"] <= r["eval_token_f1"] <= 1.0, r
    # the references the workers cut from the preprocessed 4.x eval rows: every eval record's last answer, 6 of 6
    records = json.loads(Path(paths["data.eval_path"]).read_text())
    words = [len(x["conversations"][-1]["content"].split()) for x in records]
    assert len(records) == 6 and r["eval_reference_words"] == pytest.approx(sum(words) / len(words))

    # the run's checkpoint (LoRA on both layer kinds + the connector as PEFT modules_to_save) applies for inference
    from raytune_minicpmv.infer import load_for_inference
    from raytune_minicpmv.models import load_model

    adapted, _, _ = load_for_inference(paths["model.path"], adapter=summary["checkpoint"], device="cpu")
    base = load_model(paths["model.path"], dtype=torch.float32)
    name = "model.merger.mlp.0.linear_1.weight"
    trained, before = dict(adapted.named_parameters()), dict(base.named_parameters())
    assert type(adapted).__name__ == "MiniCPMV4_6ForConditionalGeneration" and name in trained
    assert not torch.equal(trained[name], before[name])  # the trained connector, not the base's
