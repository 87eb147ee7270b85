"""Fixtures of the 4.6 / 4.7 inference tests: tiny checkpoints whose greedy answers are varied token sequences.

`build_tiny_v4(..., llm_init_std=0.1)`: at the config's 0.02 a tied-head toy LLM only repeats its last input token,
so generation tests could not tell a wrong answer from a right one. Built once per session (~5 s each)."""
import pytest


def _gen_ckpt(family, tmp_path_factory):
    from raytune_minicpmv.models.tiny_v4 import build_tiny_v4

    return build_tiny_v4(family, tmp_path_factory.mktemp(f"gen_{family}") / "ckpt", max_slice_nums=2,
                         llm_init_std=0.1)


@pytest.fixture(scope="session")
def gen46(tmp_path_factory):
    return _gen_ckpt("minicpmv4_6", tmp_path_factory)


@pytest.fixture(scope="session")
def gen47(tmp_path_factory):
    return _gen_ckpt("minicpmv4_7", tmp_path_factory)
