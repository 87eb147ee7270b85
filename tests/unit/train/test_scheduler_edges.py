"""Learning-rate schedule edges that tests/unit/train/test_scheduler.py does not reach (found by mutation testing,
docs/TESTING.md): one warmup step, a one-step decay, cosine away from its midpoint (where it equals linear), and
the floor after the last step.

    .venv/bin/python -m pytest tests/unit/train/test_scheduler_edges.py -q
"""
from __future__ import annotations

import math

import pytest

from raytune_minicpmv.train.engine import lr_lambda


def test_a_single_warmup_step_trains_the_first_step_at_the_peak():
    assert lr_lambda(0, total=10, warmup=1, kind="cosine", min_ratio=0.0) == 1.0
    assert lr_lambda(1, total=10, warmup=1, kind="cosine", min_ratio=0.0) == 1.0  # decay starts after warmup


@pytest.mark.parametrize("progress", [0.25, 0.75])
def test_cosine_is_not_linear_off_its_midpoint(progress):
    step = 10 + int(progress * 100)
    cosine = lr_lambda(step, total=110, warmup=10, kind="cosine", min_ratio=0.2)
    linear = lr_lambda(step, total=110, warmup=10, kind="linear", min_ratio=0.2)
    assert cosine == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert linear == pytest.approx(0.2 + 0.8 * (1 - progress))
    assert abs(cosine - linear) > 0.05


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_one_decay_step_reaches_the_floor(kind):
    assert lr_lambda(2, total=3, warmup=2, kind=kind, min_ratio=0.1) == pytest.approx(1.0)
    assert lr_lambda(3, total=3, warmup=2, kind=kind, min_ratio=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_after_the_last_step_the_lr_stays_at_the_floor(kind):
    """A run continued past max_steps (e.g. resumed with a larger budget) must not climb back up the cosine."""
    for step in (100, 150, 200, 1000):
        assert lr_lambda(step, total=100, warmup=10, kind=kind, min_ratio=0.1) == pytest.approx(0.1)
