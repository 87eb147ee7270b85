"""Fixtures of the 4.6 / 4.7 inference tests: tiny checkpoints whose greedy answers are varied token sequences.

`build_tiny_v4(..., llm_init_std=0.1)`: at the config's 0.02 a tied-head toy LLM only repeats its last input token,
so generation tests could not tell a wrong answer from a right one. The processor's crops are 112 pixels (64
patches) instead of 448. Built once per session (~5 s each)."""
import pytest


def _gen_ckpt(family, tmp_path_factory):
    import json

    from raytune_minicpmv.models.tiny_v4 import build_tiny_v4

    ckpt = build_tiny_v4(family, tmp_path_factory.mktemp(f"gen_{family}") / "ckpt", max_slice_nums=2,
                         llm_init_std=0.1)
    path = ckpt / "processor_config.json"  # 112-pixel crops (64 patches, still sliced): CPU forwards stay cheap
    proc = json.loads(path.read_text())
    proc["image_processor"]["scale_resolution"] = 112
    path.write_text(json.dumps(proc, indent=2))
    return ckpt


@pytest.fixture(scope="session")
def gen46(tmp_path_factory):
    return _gen_ckpt("minicpmv4_6", tmp_path_factory)


@pytest.fixture(scope="session")
def gen47(tmp_path_factory):
    return _gen_ckpt("minicpmv4_7", tmp_path_factory)
