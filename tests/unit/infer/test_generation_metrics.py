"""exact_match / token_f1 values, user metric resolution, and the config rules of eval.* / generate.*."""
import pytest

from raytune_minicpmv.config import ConfigError, load_config
from raytune_minicpmv.infer.metrics import exact_match, normalize, resolve_metrics, token_f1


def test_exact_match_on_normalized_text():
    assert normalize("  The ANSWER,\tis 7! ") == "the answer is 7"
    assert exact_match("The answer is 7.", "the answer is 7") == 1.0
    assert exact_match("The answer is 8.", "The answer is 7.") == 0.0


def test_token_f1_is_the_multiset_overlap_f1():
    assert token_f1("a grey square", "It is a grey square.") == pytest.approx(2 * 1.0 * 0.6 / 1.6)  # P=3/3, R=3/5
    assert token_f1("a a b", "a b b") == pytest.approx(2 / 3)  # overlap {a: 1, b: 1} = 2 of 3 each side
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("cat", "dog") == 0.0


def test_resolve_metrics_builtins_and_module_function():
    fns = resolve_metrics(["token_f1", "os.path:commonprefix"])
    assert list(fns) == ["token_f1", "commonprefix"] and fns["token_f1"] is token_f1
    with pytest.raises(ValueError, match="nope.mod:f.*does not resolve"):
        resolve_metrics(["nope.mod:f"])
    with pytest.raises(ValueError, match="os:sep.*not a function"):
        resolve_metrics(["os:sep"])


def _problems(*overrides):
    try:
        load_config(None, list(overrides), check_paths=False)
    except ConfigError as e:
        return e.problems
    return []


def test_config_rules_for_generation_metrics_and_decoding():
    base = ["data.eval_path=/x/eval.json"]
    assert _problems(*base, "eval.generation_metrics=[exact_match, token_f1, mypkg.m:score]",
                     "tune.metric=eval_token_f1", "tune.mode=max") == []
    assert any("'bleu' is not exact_match" in p for p in _problems(*base, "eval.generation_metrics=[bleu]"))
    assert any("needs an eval split" in p for p in _problems("eval.generation_metrics=[token_f1]"))
    assert any("set tune.mode=max" in p for p in _problems(*base, "eval.generation_metrics=[token_f1]",
                                                           "tune.metric=eval_token_f1"))
    assert any("only reported with exact_match" in p for p in _problems(*base, "tune.metric=eval_exact_match",
                                                                        "tune.mode=max"))
    assert any("two metrics under one name" in p for p in _problems(*base, "eval.generation_metrics=[a:f, b:f]"))
    bad = _problems("generate.top_p=0", "generate.temperature=0", "generate.max_new_tokens=0",
                    "generate.num_actors=0", "eval.generation_max_samples=0")
    for key in ("generate.top_p", "generate.temperature", "generate.max_new_tokens", "generate.num_actors",
                "eval.generation_max_samples"):
        assert any(p.startswith(key) for p in bad), (key, bad)


def test_generation_metrics_and_inference_are_accepted_for_the_4x_families(tiny46):
    """chat / predict / eval generation work for 4.6 / 4.7 (they were refused up front): the config check takes
    eval.generation_metrics (and tune.metric on one) for a 4.6 run, and a 4.6 checkpoint loads for inference with
    its family's processor (the 4.x rows path) as the tokenizer side."""
    from raytune_minicpmv.data.family4 import Processor4Info, Spec4
    from raytune_minicpmv.infer import load_for_inference

    cfg = load_config(None, ["model.family=minicpmv4_6", "data.eval_path=x.json", "model.downsample_mode=4x",
                             "eval.generation_metrics=[exact_match]", "tune.metric=eval_exact_match",
                             "tune.mode=max"], check_paths=False)
    assert cfg.eval.generation_metrics == ["exact_match"]
    model, info, spec = load_for_inference(tiny46, device="cpu", max_slice_nums=3, downsample_mode="4x")
    assert type(model).__name__ == "MiniCPMV4_6ForConditionalGeneration" and not model.training
    assert isinstance(info, Processor4Info) and isinstance(spec, Spec4)
    assert (spec.family, spec.max_slice_nums, info.proc.image_processor.max_slice_nums) == ("minicpmv4_6", 3, 3)
    assert info.proc.image_processor.downsample_mode == "4x" and info.divisor == 4
