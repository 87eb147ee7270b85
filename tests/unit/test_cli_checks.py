"""Up-front checks and messages of the command line (issue 10 items 11, 12, 14): every user error is one message
naming the key or file, before Ray starts, without a traceback (--debug shows it).

Run: .venv/bin/python -m pytest tests/unit/test_cli_checks.py -q
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from raytune_minicpmv.cli import main
from raytune_minicpmv.config import ConfigError, load_config
from tests.ray_teardown import shutdown_ray

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "tests" / "assets" / "minicpmv26_tokenizer"


def _ckpt(root: Path, version: str = "2.6", weights: bool = True) -> Path:
    ckpt = root / f"ckpt{version}"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "minicpmv", "version": version}))
    if weights:
        (ckpt / "model.safetensors").write_bytes(b"\0" * 8)
    return ckpt


def _config(tmp_path: Path, **sections) -> Path:
    (tmp_path / "train.json").write_text("[]")
    body = {"run": {"storage_path": str(tmp_path / "runs")}, "data": {"train_path": "train.json"},
            "model": {"path": str(_ckpt(tmp_path))}}
    for k, v in sections.items():
        body.setdefault(k, {}).update(v)
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def _problems(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    return str(e.value)


def test_family_mismatch_with_the_checkpoint_is_refused(tmp_path):
    # today: silently uses the 2.5 (llama3) template on a 2.6 checkpoint
    text = _problems(_config(tmp_path, model={"family": "minicpmv2_5"}))
    assert "model.family: 'minicpmv2_5', but" in text and "is a minicpmv2_6 checkpoint" in text
    assert "set model.family=minicpmv2_6" in text


def test_storage_path_must_be_a_directory(tmp_path):
    (tmp_path / "afile").write_text("x")
    text = _problems(_config(tmp_path), [f"run.storage_path={tmp_path / 'afile' / 'runs'}"])
    assert f"run.storage_path: {tmp_path / 'afile'} is a file, not a directory" in text


def test_data_paths_must_be_files_and_the_model_dir_a_checkpoint(tmp_path):
    (tmp_path / "datadir").mkdir()
    (tmp_path / "empty").mkdir()
    text = _problems(_config(tmp_path), [f"data.train_path={tmp_path / 'datadir'}", f"model.path={tmp_path / 'empty'}"])
    assert f"data.train_path: {tmp_path / 'datadir'} is a directory" in text
    assert f"model.path: {tmp_path / 'empty'} has no config.json" in text


def test_train_refuses_a_checkpoint_without_weights_before_starting_ray(tmp_path, capsys):
    import ray

    cfg = _config(tmp_path)
    ckpt = _ckpt(tmp_path / "noweights", weights=False)
    t0 = time.monotonic()
    rc = main(["train", "--config", str(cfg), f"model.path={ckpt}"])
    err = capsys.readouterr().err
    assert rc == 2 and time.monotonic() - t0 < 10
    assert f"model.path: {ckpt} holds no weights" in err and "Traceback" not in err
    assert not ray.is_initialized()
    # preprocess only needs config.json + tokenizer: the same directory passes the checks
    load_config(cfg, [f"model.path={ckpt}"])


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  name: x\noptim:\n  lr: 1e-4\n   warmup_steps: 2\n")  # one space too many
    assert main(["validate", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:5: YAML syntax error: mapping values are not allowed here (line 5, column 16)" in err
    assert "Traceback" not in err


def test_a_section_given_a_value_is_a_message_not_a_crash(tmp_path, capsys):
    # today: AttributeError: 'NoneType' object has no attribute 'max_steps'
    cfg = str(_config(tmp_path))
    assert main(["validate", "--config", cfg, "train=5"]) == 2
    err = capsys.readouterr().err
    assert "train: expected a section of keys, got 5 (set its keys: train.KEY=VALUE)" in err
    assert main(["validate", "--config", cfg, "optim.lr=[1,"]) == 2
    assert "the value is not valid YAML" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError):
        main(["--debug", "validate", "--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError):
        main(["validate", "--config", str(tmp_path / "missing.yaml"), "--debug"])  # after the command too


def test_merge_input_errors_are_messages(tmp_path, capsys):
    rc = main(["merge", "--base", str(tmp_path / "nobase"), "--adapter", str(tmp_path / "noadapter"),
               "--out", str(tmp_path / "out"), "--dtype", "fp32"])
    err = capsys.readouterr().err
    assert rc == 2 and "--base" in err and "no such checkpoint directory" in err and "--adapter" in err
    assert "Traceback" not in err


def test_bad_data_raised_inside_ray_is_reported_as_its_message():
    """Ray re-raises a task's exception as a RayTaskError subclass of the original; the CLI prints the original's
    message (file, record id, reason), not Ray's remote traceback."""
    from ray.exceptions import RayTaskError

    from raytune_minicpmv.cli import _user_error
    from raytune_minicpmv.data.records import BadRecord

    bad = BadRecord("/d/train.json", "r-7", "image_missing", "images/x.png does not exist")
    wrapped = RayTaskError("map_batches", "remote traceback ...", bad).as_instanceof_cause()
    try:
        try:
            raise wrapped
        except Exception as e:
            raise RuntimeError("Ray Data: user code failed") from e  # what Ray Data wraps it in
    except RuntimeError as outer:
        found = _user_error(outer, "preprocess")
    assert str(found) == "/d/train.json: record r-7: image_missing: images/x.png does not exist"
    from ray.train import WorkerGroupError

    from raytune_minicpmv.models.registry import CheckpointError

    ckpt = CheckpointError("/m: no config.json (expected a Hugging Face checkpoint directory)")
    group = WorkerGroupError("Training failed due to worker errors", {0: RuntimeError("x"), 1: ckpt})
    assert _user_error(group, "train") is ckpt  # a Train worker's error, as `trainer.fit()` raises it
    assert _user_error(RuntimeError("a bug"), "train") is None
    assert _user_error(ValueError("x"), "train") is None and _user_error(ValueError("x"), "merge") is not None


def test_override_paths_resolve_against_the_cwd_and_file_paths_against_the_file(tmp_path, monkeypatch):
    conf_dir, work = tmp_path / "conf", tmp_path / "work"
    conf_dir.mkdir()
    work.mkdir()
    (conf_dir / "file_data.json").write_text("[]")
    (work / "cli_data.json").write_text("[]")
    ckpt = _ckpt(tmp_path)
    cfg_path = conf_dir / "c.yaml"
    cfg_path.write_text(json.dumps({"data": {"train_path": "file_data.json"}, "model": {"path": str(ckpt)},
                                    "run": {"storage_path": "runs"}}))
    monkeypatch.chdir(work)
    cfg = load_config(cfg_path, ["data.eval_path=cli_data.json", "run.storage_path=out/runs"])
    assert cfg.data.train_path == str(conf_dir / "file_data.json")  # from the file: next to the file
    assert cfg.data.eval_path == str(work / "cli_data.json")  # from the command line: the CWD, as a shell would
    assert cfg.run.storage_path == str(work / "out" / "runs")


def test_an_empty_train_split_is_a_message_not_a_traceback(tmp_path, capsys):
    """EmptySplitError (a SplitError, not a SkipCapError) is the user's to fix: printed as its message."""
    cfg = _config(tmp_path)  # train.json is `[]`
    try:
        rc = main(["preprocess", "--config", str(cfg)])
    finally:
        shutdown_ray()  # the split is found empty after the local Ray started
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "data.train_path" in err and "the train split has no usable record" in err and "Traceback" not in err
