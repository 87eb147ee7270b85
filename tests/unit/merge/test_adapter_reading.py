"""`read_adapter` and its helpers called directly on tiny adapter folders written here (no PEFT model, no merge):
which key is filed how, and which malformed or unsupported adapter is refused with which message (found by mutation
testing, docs/TESTING.md "Adapter reading and merge verification").

    .venv/bin/python -m pytest tests/unit/merge/test_adapter_reading.py -q
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from raytune_minicpmv.merge.adapter import OLD_SIDE_FILE, UnsupportedAdapterError, read_adapter

P = "base_model.model."
Q = "llm.layers.0.q_proj"  # a LoRA target of the base below: weight [6, 4] and a bias
BASE = {f"{Q}.weight", f"{Q}.bias", "llm.embed.weight", "llm.norm.weight", "vpm.proj.weight"}


def write_adapter(path, tensors: dict, config: dict | None = None, name="adapter_model.safetensors"):
    path.mkdir(parents=True, exist_ok=True)
    if tensors:
        save_file(tensors, str(path / name))
    if config is not None:
        (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def lora(module=Q, r=2, fan_in=4, fan_out=6, name=""):
    sep = f".{name}" if name else ""
    return {f"{P}{module}.lora_A{sep}.weight": torch.ones(r, fan_in), f"{P}{module}.lora_B{sep}.weight": torch.ones(fan_out, r)}


def cfg(**kw):
    return {"peft_type": "LORA", "r": 2, "lora_alpha": 8, **kw}


def refused(path, tensors, config, base=BASE) -> list[str]:
    """The problem lines of the ValueError read_adapter raises, after checking its header names the folder."""
    write_adapter(path, tensors, config)
    with pytest.raises(ValueError) as err:
        read_adapter(path, base)
    head, *lines = str(err.value).split("\n")
    assert head == f"adapter {path} does not fit the base checkpoint:"
    assert all(line.startswith("  ") for line in lines)
    return [line[2:] for line in lines]


# ---- filing the keys -------------------------------------------------------------------------------------------


def test_a_plain_lora_is_filed_under_its_target_with_alpha_over_r(tmp_path):
    adapter = read_adapter(write_adapter(tmp_path, lora(), cfg()), BASE)
    assert set(adapter.lora) == {f"{Q}.weight"} and adapter.replacements == {} and adapter.lora_bias == {}
    f = adapter.lora[f"{Q}.weight"]
    assert (f.a_key, f.b_key) == (f"adapter:{P}{Q}.lora_A.weight", f"adapter:{P}{Q}.lora_B.weight")
    assert f.scaling == 4.0 and f.embedding is False and f.fan_in_fan_out is False
    assert torch.equal(adapter.tensors.get(f.a_key), torch.ones(2, 4))
    assert adapter.config == cfg() and adapter.nbytes == (8 + 12) * 4


def test_named_adapter_keys_rslora_and_fan_in_fan_out(tmp_path):
    adapter = read_adapter(write_adapter(tmp_path, lora(r=4, name="default"),
                                         cfg(r=4, lora_alpha=8, use_rslora=True, fan_in_fan_out=True)), BASE)
    f = adapter.lora[f"{Q}.weight"]
    assert f.a_key == f"adapter:{P}{Q}.lora_A.default.weight" and f.b_key.endswith("lora_B.default.weight")
    assert f.scaling == 4.0 and f.fan_in_fan_out is True  # 8 / sqrt(4), not 8 / 4


def test_rank_and_alpha_patterns_apply_per_module(tmp_path):
    k = "llm.layers.0.k_proj"
    tensors = {**lora(r=2), **lora(module=k, r=4)}
    config = cfg(r=2, lora_alpha=8, rank_pattern={"k_proj": 4}, alpha_pattern={"layers.0.q_proj": 3})
    adapter = read_adapter(write_adapter(tmp_path, tensors, config), BASE | {f"{k}.weight"})
    assert adapter.lora[f"{Q}.weight"].scaling == 1.5  # alpha from alpha_pattern, r from r
    assert adapter.lora[f"{k}.weight"].scaling == 2.0  # r from rank_pattern, alpha from lora_alpha


def test_embedding_factors_are_marked_and_never_transposed_as_fan_in_fan_out(tmp_path):
    tensors = {f"{P}llm.embed.lora_embedding_A": torch.ones(2, 10), f"{P}llm.embed.lora_embedding_B": torch.ones(4, 2)}
    adapter = read_adapter(write_adapter(tmp_path, tensors, cfg(fan_in_fan_out=True)), BASE)
    f = adapter.lora["llm.embed.weight"]
    assert f.embedding is True and f.fan_in_fan_out is False
    assert (f.a_key, f.b_key) == (f"adapter:{P}llm.embed.lora_embedding_A", f"adapter:{P}llm.embed.lora_embedding_B")


def test_a_lora_bias_is_scaled_like_its_weight(tmp_path):
    tensors = {**lora(), f"{P}{Q}.lora_B.bias": torch.ones(6)}
    adapter = read_adapter(write_adapter(tmp_path, tensors, cfg(lora_alpha=2)), BASE)
    assert adapter.lora_bias == {f"{Q}.bias": (f"adapter:{P}{Q}.lora_B.bias", 1.0)}
    adapter = read_adapter(write_adapter(tmp_path, tensors, cfg(lora_alpha=6)), BASE)
    assert adapter.lora_bias[f"{Q}.bias"][1] == 3.0


def test_trained_copies_modules_to_save_and_base_layer_keys_become_replacements(tmp_path):
    tensors = {**lora(), f"{P}llm.norm.modules_to_save.default.weight": torch.ones(4),
               f"{P}vpm.proj.base_layer.weight": torch.ones(2), f"{P}llm.embed.weight": torch.ones(3),
               f"{P}llm.norm.original_module.weight": torch.ones(4)}  # a frozen base copy: skipped, not a problem
    adapter = read_adapter(write_adapter(tmp_path, tensors, cfg()), BASE)
    assert adapter.replacements == {"llm.norm.weight": f"adapter:{P}llm.norm.modules_to_save.default.weight",
                                    "vpm.proj.weight": f"adapter:{P}vpm.proj.base_layer.weight",
                                    "llm.embed.weight": f"adapter:{P}llm.embed.weight"}
    assert set(adapter.lora) == {f"{Q}.weight"}


def test_a_full_model_dir_is_read_without_a_config(tmp_path):
    write_adapter(tmp_path, {"llm.norm.weight": torch.ones(4)}, name="model-00001.safetensors")
    save_file({"vpm.proj.weight": torch.ones(2)}, str(tmp_path / "model-00002.safetensors"))
    adapter = read_adapter(tmp_path, BASE)
    assert adapter.config == {} and adapter.lora == {}
    assert adapter.replacements == {"llm.norm.weight": "adapter:llm.norm.weight",
                                    "vpm.proj.weight": "adapter:vpm.proj.weight"}
    assert torch.equal(adapter.tensors.get("adapter:vpm.proj.weight"), torch.ones(2))


def test_adapter_model_bin_is_read_when_there_are_no_safetensors(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    torch.save(lora(), tmp_path / "adapter_model.bin")
    adapter = read_adapter(write_adapter(tmp_path, {}, cfg()), BASE)
    assert adapter.lora[f"{Q}.weight"].a_key == f"adapter:{P}{Q}.lora_A.weight"
    assert torch.equal(adapter.tensors.get(f"adapter:{P}{Q}.lora_B.weight"), torch.ones(6, 2))
    # safetensors win over a .bin beside them (the .bin here holds a factor the safetensors lack)
    save_file({f"{P}llm.norm.weight": torch.ones(4)}, str(tmp_path / "adapter_model.safetensors"))
    adapter = read_adapter(tmp_path, BASE)
    assert adapter.lora == {} and set(adapter.replacements) == {"llm.norm.weight"}


def test_the_old_side_file_is_applied_after_the_adapter(tmp_path):
    write_adapter(tmp_path, {**lora(), f"{P}llm.norm.weight": torch.zeros(4)}, cfg())
    torch.save({"llm.norm.weight": torch.full((4,), 3.0), f"{P}vpm.proj.weight": torch.ones(2)}, tmp_path / OLD_SIDE_FILE)
    adapter = read_adapter(tmp_path, BASE)
    assert adapter.replacements == {"llm.norm.weight": "side:llm.norm.weight", "vpm.proj.weight": f"side:{P}vpm.proj.weight"}
    assert torch.equal(adapter.tensors.get(adapter.replacements["llm.norm.weight"]), torch.full((4,), 3.0))
    assert set(adapter.lora) == {f"{Q}.weight"}


def test_lora_named_keys_in_the_side_file_are_trained_tensors_not_factors(tmp_path):
    write_adapter(tmp_path, {f"{P}llm.norm.weight": torch.zeros(4)}, cfg())
    torch.save({f"{Q}.lora_A.weight": torch.ones(2, 4)}, tmp_path / OLD_SIDE_FILE)
    assert refused(tmp_path, {}, None) == [
        f"{Q}.lora_A.weight: trained tensor {Q}.lora_A.weight has no counterpart in the base checkpoint"]


# ---- what is refused, and how ------------------------------------------------------------------------------------


def test_neither_a_config_nor_tensors_is_not_an_adapter(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    with pytest.raises(FileNotFoundError, match=r"^" + re.escape(f"{tmp_path}: neither a PEFT adapter "
                                                                 "(adapter_config.json) nor safetensors of trained tensors") + "$"):
        read_adapter(tmp_path, BASE)


def test_a_config_without_tensors_points_at_zero3(tmp_path):
    assert refused(tmp_path, {}, cfg()) == [
        "the adapter holds no tensors (an adapter saved under ZeRO-3 without gathering the parameters is empty; "
        "see docs/MERGE.md)"]


def test_keys_that_fit_no_base_weight_are_listed_each_with_its_reason(tmp_path):
    tensors = {**lora(module="llm.layers.9.q_proj"), f"{P}llm.head.weight": torch.ones(2),
               f"{P}llm.layers.9.q_proj.lora_B.bias": torch.ones(6), f"{P}{Q}.lora_A.bias": torch.ones(2), **lora()}
    problems = refused(tmp_path, tensors, cfg())
    assert sorted(problems) == sorted([
        f"{P}llm.layers.9.q_proj.lora_A.weight: LoRA targets llm.layers.9.q_proj.weight, which the base checkpoint "
        "does not have",
        f"{P}llm.layers.9.q_proj.lora_B.weight: LoRA targets llm.layers.9.q_proj.weight, which the base checkpoint "
        "does not have",
        f"{P}llm.head.weight: trained tensor llm.head.weight has no counterpart in the base checkpoint",
        f"{P}llm.layers.9.q_proj.lora_B.bias: LoRA targets llm.layers.9.q_proj.weight, which the base checkpoint "
        "does not have",
        f"{P}{Q}.lora_A.bias: a LoRA bias without a base bias {Q}.bias",
    ])


def test_a_lora_b_bias_needs_a_base_bias(tmp_path):
    tensors = {**lora(), f"{P}{Q}.lora_B.bias": torch.ones(6)}
    assert refused(tmp_path, tensors, cfg(), base=BASE - {f"{Q}.bias"}) == [
        f"{P}{Q}.lora_B.bias: a LoRA bias without a base bias {Q}.bias"]


@pytest.mark.parametrize("missing", ["A", "B"])
def test_a_factor_without_its_partner_is_refused(tmp_path, missing):
    tensors = {k: v for k, v in lora().items() if f"lora_{missing}" not in k}
    assert refused(tmp_path, tensors, cfg()) == [f"{Q}.weight: LoRA {missing} matrix missing"]


@pytest.mark.parametrize("shape", [(8,), (0, 4), (2, 0)], ids=["1d", "empty_rank", "empty_fan_in"])
def test_an_ungathered_zero3_factor_is_refused(tmp_path, shape):
    tensors = {**lora(), f"{P}{Q}.lora_A.weight": torch.ones(shape)}
    assert refused(tmp_path, tensors, cfg()) == [
        f"{Q}.weight: lora_A has shape {shape}; a 1-D or empty factor means it was saved from ZeRO-3 shards without "
        "gathering them (re-save under deepspeed.zero.GatheredParameters)"]


def test_a_rank_that_differs_from_the_config_is_refused(tmp_path):
    assert refused(tmp_path, lora(r=3), cfg(r=2)) == [
        f"{Q}.weight: lora_A has rank 3 but adapter_config.json says r=2 (rank_pattern mismatch)"]
    assert refused(tmp_path, lora(r=3), cfg(r=2, rank_pattern={"q_proj": 4})) == [
        f"{Q}.weight: lora_A has rank 3 but adapter_config.json says r=4 (rank_pattern mismatch)"]


@pytest.mark.parametrize("drop", ["r", "lora_alpha"])
def test_a_config_without_r_or_alpha_is_refused(tmp_path, drop):
    config = {k: v for k, v in cfg().items() if k != drop}
    assert refused(tmp_path, lora(), config) == [f"{Q}.weight: adapter_config.json gives no r / lora_alpha"]


def test_every_problem_is_counted_and_the_first_twenty_shown(tmp_path):
    tensors = {f"{P}llm.x{i:02d}.weight": torch.ones(1) for i in range(23)}
    problems = refused(tmp_path, tensors, cfg())
    assert len(problems) == 21 and problems[-1] == "… and 3 more"
    assert problems[0] == f"{P}llm.x00.weight: trained tensor llm.x00.weight has no counterpart in the base checkpoint"
    exactly = {f"{P}llm.x{i:02d}.weight": torch.ones(1) for i in range(20)}
    assert len(refused(tmp_path / "twenty", exactly, cfg())) == 20  # no "… and 0 more"


UNSUPPORTED = {
    "use_dora": "use_dora: DoRA (its magnitude vector rescales whole columns; merge with peft's merge_and_unload)",
    "use_qalora": "use_qalora: QA-LoRA",
    "alora_invocation_tokens": "alora_invocation_tokens: activated LoRA (aLoRA cannot be merged)",
    "target_parameters": "target_parameters: LoRA on nn.Parameter targets",
    "layer_replication": "layer_replication: layer replication",
    "trainable_token_indices": "trainable_token_indices: trainable tokens",
    "megatron_config": "megatron_config: Megatron parallel layers",
    "velora_config": "velora_config: VeLoRA",
    "monteclora_config": "monteclora_config: MonteCLoRA",
}


@pytest.mark.parametrize("option", list(UNSUPPORTED))
def test_options_that_cannot_be_folded_are_refused_before_any_tensor_is_read(tmp_path, option):
    write_adapter(tmp_path, {}, cfg(**{option: [1]}))  # no tensors: the refusal comes first
    with pytest.raises(UnsupportedAdapterError) as err:
        read_adapter(tmp_path, BASE)
    assert str(err.value) == f"{tmp_path}: cannot merge this adapter: {UNSUPPORTED[option]}"


def test_every_refusal_is_listed_and_false_options_are_accepted(tmp_path):
    write_adapter(tmp_path, {}, cfg(peft_type="LOHA", use_dora=True, use_rslora=True, megatron_config={"x": 1}))
    with pytest.raises(UnsupportedAdapterError) as err:
        read_adapter(tmp_path, BASE)
    assert str(err.value) == (f"{tmp_path}: cannot merge this adapter: peft_type LOHA (only LORA is merged); "
                              f"{UNSUPPORTED['use_dora']}; {UNSUPPORTED['megatron_config']}")
    off = cfg(**{**{option: None for option in UNSUPPORTED}, "use_dora": False, "layer_replication": []})
    del off["peft_type"]  # PEFT's older configs: LORA by default
    assert read_adapter(write_adapter(tmp_path / "ok", lora(), off), BASE).lora[f"{Q}.weight"].scaling == 4.0


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_16", "PiSSA", "olora", "corda", "loftq", "lora_ga"])
def test_inits_that_change_the_base_weights_are_refused(tmp_path, init):
    write_adapter(tmp_path, lora(), cfg(init_lora_weights=init))
    with pytest.raises(UnsupportedAdapterError) as err:
        read_adapter(tmp_path, BASE)
    assert str(err.value) == (
        f"{tmp_path}: cannot merge this adapter: init_lora_weights={init!r} changes the base weights at init, so the "
        "adapter does not apply to the original base (convert it to a plain LoRA with peft first)")


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "my_pissa"])
def test_inits_that_leave_the_base_alone_are_accepted(tmp_path, init):
    adapter = read_adapter(write_adapter(tmp_path, lora(), cfg(init_lora_weights=init)), BASE)
    assert set(adapter.lora) == {f"{Q}.weight"}


def test_every_target_is_checked_after_one_fails(tmp_path):
    """One problem per target, whatever comes first; the good target still gets its scaling."""
    mods = {m: f"llm.layers.0.{m}" for m in ("a_proj", "b_proj", "c_proj", "d_proj", "e_proj")}
    tensors = {**{k: v for k, v in lora(mods["a_proj"]).items() if "lora_B" not in k},
               **lora(mods["b_proj"]), f"{P}{mods['b_proj']}.lora_A.weight": torch.ones(8),
               **lora(mods["c_proj"], r=3), **lora(mods["d_proj"]), **lora(mods["e_proj"])}
    config = cfg(rank_pattern={"d_proj": 2}, alpha_pattern={"d_proj": None, "e_proj": 2})
    write_adapter(tmp_path, tensors, config)
    base = BASE | {f"{m}.weight" for m in mods.values()}
    with pytest.raises(ValueError) as err:
        read_adapter(tmp_path, base)
    problems = [line[2:] for line in str(err.value).split("\n")[1:]]
    assert problems == [
        f"{mods['a_proj']}.weight: LoRA B matrix missing",
        f"{mods['b_proj']}.weight: lora_A has shape (8,); a 1-D or empty factor means it was saved from ZeRO-3 shards "
        "without gathering them (re-save under deepspeed.zero.GatheredParameters)",
        f"{mods['c_proj']}.weight: lora_A has rank 3 but adapter_config.json says r=2 (rank_pattern mismatch)",
        f"{mods['d_proj']}.weight: adapter_config.json gives no r / lora_alpha",
    ]


class _Payload:
    """A pickle that runs code when loaded: what a hostile .bin / side file would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.mark.parametrize("file", ["adapter_model.bin", OLD_SIDE_FILE])
def test_pickled_files_are_loaded_weights_only_even_if_the_environment_relaxes_it(tmp_path, monkeypatch, file):
    """torch honours TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD only where the caller leaves `weights_only` unset."""
    import pickle

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    folder = write_adapter(tmp_path / "a", lora() if file == OLD_SIDE_FILE else {}, cfg())
    marker = tmp_path / "code_ran"
    torch.save({"llm.norm.weight": _Payload(marker)}, folder / file)
    with pytest.raises(pickle.UnpicklingError):
        read_adapter(folder, BASE)
    assert not marker.exists()


def _save_as_if_on_cuda(obj, path):
    """torch.save, then the storages' location tag rewritten to cuda:0: the file a GPU training run writes."""
    import zipfile

    torch.save(obj, path)
    entries = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            entries[info.filename] = z.read(info.filename)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            if name.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            z.writestr(name, data)


def test_pickled_files_saved_from_gpu_tensors_load_on_the_cpu(tmp_path):
    folder = write_adapter(tmp_path, {}, cfg())
    _save_as_if_on_cuda(lora(), folder / "adapter_model.bin")
    _save_as_if_on_cuda({"llm.norm.weight": torch.full((4,), 3.0)}, folder / OLD_SIDE_FILE)
    adapter = read_adapter(folder, BASE)
    a, norm = adapter.tensors.get(adapter.lora[f"{Q}.weight"].a_key), adapter.tensors.get("side:llm.norm.weight")
    assert a.device.type == norm.device.type == "cpu" and torch.equal(norm, torch.full((4,), 3.0))
