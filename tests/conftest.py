"""Shared fixtures: tiny checkpoints in the PUBLISHED layout (what users download), built once per test session.

    def test_x(published26): load_model(published26)          # a Path; treat it as read-only (copy to modify)

`published26` / `published25` come from `build_tiny(family, dir, layout="published")` (models/published.py): the
real config.json / tokenizer_config.json / preprocessor files with only the sizes shrunk, sharded bf16 random
weights under the official key names, and empty placeholders for the remote-code .py files. ~5 s each on CPU.
"""
import pytest


@pytest.fixture(scope="session")
def published26(tmp_path_factory):
    from raytune_minicpmv.models import build_tiny

    return build_tiny("minicpmv2_6", tmp_path_factory.mktemp("published") / "MiniCPM-V-2_6", layout="published")


@pytest.fixture(scope="session")
def published25(tmp_path_factory):
    from raytune_minicpmv.models import build_tiny

    return build_tiny("minicpmv2_5", tmp_path_factory.mktemp("published") / "MiniCPM-Llama3-V-2_5",
                      layout="published")


@pytest.fixture(scope="session")
def tiny46(tmp_path_factory):
    """A tiny random MiniCPM-V 4.6 checkpoint (transformers' config classes, sharded safetensors, the tiny 4.x
    tokenizer + processor files), ~2 s."""
    from raytune_minicpmv.models import build_tiny

    return build_tiny("minicpmv4_6", tmp_path_factory.mktemp("tiny46") / "MiniCPM-V-4.6", max_shard_size="500KB")


@pytest.fixture(scope="session")
def tiny47(tmp_path_factory):
    """A tiny random MiniCPM-V 4.7 checkpoint (dense LLM), ~2 s."""
    from raytune_minicpmv.models import build_tiny

    return build_tiny("minicpmv4_7", tmp_path_factory.mktemp("tiny47") / "MiniCPM-V-4.7", max_shard_size="500KB")
