"""The kernel switches of a run config (`model.vision_varlen`, `model.fused_ce`, `model.liger`,
`model.compile_vision`): accepted values load, impossible combinations are refused naming the key path.

Run: pytest tests/unit/models/test_kernel_switches.py   (~2 s)
"""
from __future__ import annotations

import pytest

from raytune_minicpmv.config import ConfigError, load_config


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("true", True), ("false", False)])
def test_each_switch_takes_auto_true_false(value, expected):
    cfg = load_config(None, [f"model.vision_varlen={value}", f"model.fused_ce={value}",
                             "scaling.use_gpu=true", f"model.liger={value}"], check_paths=False)
    assert (cfg.model.vision_varlen, cfg.model.fused_ce, cfg.model.liger) == (expected,) * 3


def test_defaults_are_auto_and_compile_off():
    m = load_config(None, [], check_paths=False).model
    assert (m.vision_varlen, m.fused_ce, m.liger, m.compile_vision) == ("auto", "auto", "auto", False)


@pytest.mark.parametrize("overrides, key", [
    (["model.vision_varlen=true", "model.family=minicpmv2_5"], "model.vision_varlen"),
    (["model.liger=true", "scaling.use_gpu=false"], "model.liger"),
    (["model.fused_ce=sometimes"], "model.fused_ce"),
])
def test_impossible_values_are_refused_with_the_key_path(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, check_paths=False)
    assert key in str(e.value)
