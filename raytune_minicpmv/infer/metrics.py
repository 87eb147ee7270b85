"""Metrics of a generated answer against the reference answer, per sample (averaged by the caller).

    fns = resolve_metrics(["exact_match", "token_f1", "mypkg.scoring:bleu1"])   # {"exact_match": fn, ..., "bleu1": fn}
    fns["token_f1"]("The answer is 7.", "the answer is 7")                      # 1.0

Built-ins compare normalized text (lowercase, punctuation dropped, whitespace collapsed): `exact_match` is 1.0 or
0.0, `token_f1` the F1 of the whitespace tokens' multiset overlap (SQuAD's), 1.0 when both are empty. A user metric
is "module:function", a function (prediction: str, reference: str) -> float, imported where the metric is computed
(the Train workers: the module must be importable there, e.g. shipped in the job's working dir).
"""
from __future__ import annotations

import importlib
import re
import string
from collections import Counter
from typing import Callable

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


BUILTIN = {"exact_match": exact_match, "token_f1": token_f1}


def resolve_metrics(names: list[str]) -> dict[str, Callable[[str, str], float]]:
    """Metric name (the part reported as eval_<name>) -> function. Raises ValueError naming the entry that does not
    resolve (eval.generation_metrics)."""
    out = {}
    for name in names:
        if name in BUILTIN:
            out[name] = BUILTIN[name]
            continue
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"eval.generation_metrics: {name!r} does not resolve ({e}); the module must be "
                             "importable in the Train workers") from None
        if not callable(fn):
            raise ValueError(f"eval.generation_metrics: {name!r} is not a function")
        out[attr] = fn
    return out
