"""A user generation metric for test_infer.py (eval.generation_metrics: tests.integration.infer_user_metric:...),
imported inside the Train workers: the number of words of the reference answer the worker cut from the eval row."""


def reference_words(prediction: str, reference: str) -> float:
    return float(len(reference.split()))
