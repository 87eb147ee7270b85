"""The config engine: overrides, type checks, every problem reported at once, path resolution."""
from pathlib import Path

import pytest

from raytune_minicpmv.config import ConfigError, config_from_dict, join_uri, load_config, replace, resolve_llm_type


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_overrides_and_types(tmp_path):
    (tmp_path / "d.json").write_text("[]")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "minicpmv", "version": "2.6"}')
    p = _write(tmp_path, "data: {train_path: d.json}\nmodel: {path: m}\n")
    cfg = load_config(p, ["optim.lr=3e-4", "train.max_steps=7", "scaling.use_gpu=false", "tune.search.lr=[1e-5,1e-3]",
                          "tune.driver_resources={CPU: 0.1}"])
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 7 and cfg.scaling.use_gpu is False
    assert cfg.tune.search.lr == [1e-5, 1e-3] and cfg.tune.driver_resources == {"CPU": 0.1}
    # relative paths resolve against the config file's directory, not the CWD
    assert cfg.data.train_path == str(tmp_path / "d.json")
    assert cfg.model.path == str(tmp_path / "m")


def test_every_problem_reported_at_once(tmp_path):
    p = _write(tmp_path, "data: {train_path: missing.json, on_bad_record: maybe}\n"
                         "optim: {lr: 2.0, sheduler: cosine}\ntrain: {max_steps: zero}\nbogus: {}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    text = str(e.value)
    for expected in ("data.on_bad_record: 'maybe' is not one of", "optim.sheduler: unknown key (did you mean optim.scheduler?)",
                     "train.max_steps: expected int", "bogus: unknown key", "optim.lr: must be in (0, 1)",
                     "data.train_path:", "model.path: required"):
        assert expected in text, (expected, text)
    assert len(e.value.problems) >= 7


def test_cross_field_rules():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"deepspeed": {"zero_stage": 2, "offload_param": "cpu"},
                          "trainable": {"vision": "frozen", "resampler": "frozen", "llm": "frozen"},
                          "tune": {"search": {"lr": [1e-3, 1e-5]}}}, check_paths=False)
    text = str(e.value)
    assert "offload_param" in text and "every part is frozen" in text and "0 < low < high" in text


def test_yaml_float_strings_and_bad_override():
    cfg = config_from_dict({"optim": {"lr": "1e-4"}}, check_paths=False)  # YAML 1.1 reads 1e-4 as a string
    assert cfg.optim.lr == 1e-4
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(None, ["optim.lr"], check_paths=False)


def test_derived_values():
    cfg = config_from_dict({"run": {"name": "x", "storage_path": "s3://b/runs/"},
                            "train": {"micro_batch_size": 2, "gradient_accumulation_steps": 3},
                            "scaling": {"num_workers": 4}}, check_paths=False)
    assert cfg.run_dir == "s3://b/runs/x" and cfg.data_output_path == "s3://b/runs/x/data"
    assert cfg.global_batch_size == 24
    assert join_uri("/a/", "b", "/c") == "/a/b/c"
    assert resolve_llm_type(cfg) == "qwen2"
    assert resolve_llm_type(replace(cfg, model={"family": "minicpmv2_5"})) == "llama3"
    assert resolve_llm_type(replace(cfg, data={"llm_type": "qwen"})) == "qwen2"
