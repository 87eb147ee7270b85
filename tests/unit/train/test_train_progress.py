"""The training loop's cadence (what each step logs, evaluates, saves, reports to Ray) and its progress lines."""
import pytest

from raytune_minicpmv.config import load_config
from raytune_minicpmv.train.progress import Progress, step_actions


def cfg(*overrides):
    return load_config(None, list(overrides), check_paths=False)


def _steps(c, has_eval, what):
    return [s for s in range(1, c.train.max_steps + 1) if getattr(step_actions(c.train, s, has_eval), what)]


def test_logging_every_step_reports_to_ray_only_at_evaluations_and_checkpoints():
    """Issue 9 defect 6: every ray.train.report waits for the controller's poll (2 s); logging_steps=1 must not
    turn into one report per step."""
    c = cfg("train.max_steps=25", "train.logging_steps=1", "train.eval_steps=10", "train.save_steps=20")
    assert _steps(c, True, "log") == list(range(1, 26))
    assert _steps(c, True, "report") == [10, 20, 25]
    assert _steps(c, True, "evaluate") == [10, 20, 25]  # and at the end
    assert _steps(c, True, "save") == [20, 25]


def test_no_eval_split_no_evaluation_but_checkpoints():
    """Issue 9 defect 2: without an eval split no step evaluates; checkpoints (and their reports) stay."""
    c = cfg("train.max_steps=7", "train.logging_steps=2", "train.eval_steps=2", "train.save_steps=3")
    assert _steps(c, False, "evaluate") == []
    assert _steps(c, False, "save") == _steps(c, False, "report") == [3, 6, 7]
    assert _steps(c, False, "log") == [2, 3, 4, 6, 7]


@pytest.mark.parametrize("max_steps,eval_steps", [(8, 4), (10, 4), (3, 5)])
def test_tune_trials_checkpoint_at_every_evaluation(max_steps, eval_steps):
    """Issue 18 item 5: every evaluation of a Tune trial carries a checkpoint, so the best evaluation can always
    be merged (also the end-of-run evaluation when max_steps is not a multiple of eval_steps)."""
    from raytune_minicpmv.tune.search import _tune_ready

    c = _tune_ready(cfg(f"train.max_steps={max_steps}", f"train.eval_steps={eval_steps}", "train.save_steps=1000",
                        "data.eval_path=/x/eval.json"))
    evaluated = _steps(c, True, "evaluate")
    assert evaluated and evaluated[-1] == max_steps
    assert _steps(c, True, "save") == evaluated == _steps(c, True, "report")
    from raytune_minicpmv.train.trainer import checkpoint_config

    assert checkpoint_config(c.train, has_eval=True).checkpoint_score_attribute == "eval_loss"  # the best is kept


def test_progress_lines_only_on_rank_zero_with_elapsed(capsys):
    t = [1000.0]
    Progress(1, clock=lambda: t[0])("loading model ...")
    p = Progress(0, clock=lambda: t[0])
    t[0] += 75
    p("loading model ...")
    assert capsys.readouterr().out == "[0:01:15] loading model ...\n"


def test_step_line_eta_from_the_steps_of_this_attempt(capsys):
    from raytune_minicpmv.train.metrics import FlopModel, StepCounts, ThroughputMeter
    from raytune_minicpmv.train.progress import StepReporter

    t = [0.0]
    clock = lambda: t[0]  # noqa: E731
    meter = ThroughputMeter(FlopModel({"llm": 0, "vpm": 0, "resampler": 0}, {"llm": 0, "vpm": 0, "resampler": 0}),
                            0.0, 1, clock=clock)
    r = StepReporter(meter, None, rank=0, world=1, max_steps=100, progress=Progress(0, clock=clock), clock=clock)
    t[0] = 30.0  # model load etc.
    r.start(step=40)  # resumed at step 40
    for _ in range(10):
        t[0] += 2.0
        r.add_step(1.0, StepCounts(label_tokens=1, real_tokens=1, padded_tokens=1), 2.0, 0.0, 1e-4)
    assert r.eta_s(50) == pytest.approx(50 * 2.0)  # 50 steps left at 2 s each (not 20 s / 50 steps done)
    r.log({"step": 50, "loss": 1.0, "lr": 1e-4, "grad_norm": 0.1, **meter.snapshot()})
    line = capsys.readouterr().out
    assert line.startswith("step 50/100 | loss 1.0000") and "2.00 s/step" in line
    assert line.rstrip().endswith("0:00:50 elapsed, eta 0:01:40")
