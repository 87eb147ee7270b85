"""The learning-rate schedule is the one the config names: warmup, then cosine / linear / constant."""
import math

import pytest
import torch

from raytune_minicpmv.config import load_config
from raytune_minicpmv.train.engine import build_lr_scheduler, warmup_steps


def lrs(*overrides, steps=None):
    cfg = load_config(None, ["optim.lr=0.5", *overrides], check_paths=False)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.optim.lr)
    sched = build_lr_scheduler(opt, cfg.optim, cfg.train.max_steps)
    out = []
    for _ in range(steps or cfg.train.max_steps):
        out.append(opt.param_groups[0]["lr"] / 0.5)  # multiplier of the peak lr for the next optimizer step
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_to_min_ratio():
    lr = lrs("train.max_steps=100", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1")
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)  # linear warmup, never 0 at step 1
    assert lr[10] == pytest.approx(1.0)
    assert lr[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))  # monotone decay
    assert lr[-1] > 0.1 - 1e-9


def test_linear_and_constant():
    lin = lrs("train.max_steps=10", "optim.scheduler=linear", "optim.warmup_steps=0")
    assert lin[0] == pytest.approx(1.0) and lin[5] == pytest.approx(0.5)
    const = lrs("train.max_steps=10", "optim.scheduler=constant", "optim.warmup_steps=2")
    assert const[:3] == pytest.approx([0.5, 1.0, 1.0]) and const[-1] == pytest.approx(1.0)


def test_warmup_ratio_rounds_up_and_warmup_steps_wins():
    def warmup(*overrides):
        cfg = load_config(None, list(overrides), check_paths=False)
        return warmup_steps(cfg.optim, cfg.train.max_steps)

    assert warmup("train.max_steps=1000", "optim.warmup_ratio=0.01") == 10
    assert warmup("train.max_steps=50", "optim.warmup_ratio=0.01") == 1
    assert warmup("train.max_steps=50", "optim.warmup_steps=7") == 7
