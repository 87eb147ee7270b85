"""The printed parameter table for a model without LoRA (a part with no parameters at all), and the full text of
the refusal of `trainable.llm=full` next to LoRA.

Found by mutation testing (docs/TESTING.md): every table the tests printed had LoRA parameters, so a division by
a part's zero total went unnoticed, and the refusal was matched on its first words only.

Run: pytest tests/unit/models/test_policy_table.py   (~3 s)
"""
from __future__ import annotations

import pytest
import torch

from raytune_minicpmv.config import LoraConfig, TrainableConfig
from raytune_minicpmv.models import apply_trainable_policy, build_tiny, format_parameter_table, load_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(build_tiny("minicpmv2_6", tmp_path_factory.mktemp("tiny"), query_num=16), dtype=torch.float32)


def test_a_model_without_lora_prints_zero_percent_for_the_empty_lora_part(model):
    frozen = apply_trainable_policy(model, TrainableConfig(vision="frozen", resampler="full", llm="frozen",
                                                           embed_tokens="frozen"), LoraConfig())
    rows = {line.split()[0]: line.split()[1:] for line in format_parameter_table(frozen).splitlines()[1:]}
    assert rows["lora"] == ["0", "0", "0.00%"]
    assert rows["resampler"][-1] == "100.00%" and rows["vision"][0] == "0"
    assert set(rows) == {"vision", "resampler", "embed_tokens", "llm", "lora", "total"}


def test_llm_full_next_to_lora_is_refused_with_the_way_out(model):
    with pytest.raises(ValueError) as err:
        apply_trainable_policy(model, TrainableConfig(vision="lora", llm="full"), LoraConfig())
    assert str(err.value) == ("trainable.llm=full with LoRA elsewhere would copy the whole LLM into the adapter; "
                              "use trainable.llm=lora (or make every part full/frozen without LoRA)")
