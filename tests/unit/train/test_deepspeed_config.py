"""The DeepSpeed config, optimizer grouping and precision/offload choices built from our config."""
import pytest
import torch

from raytune_minicpmv.config import ConfigError, load_config
from raytune_minicpmv.train.engine import build_ds_config, build_optimizer, fix_cuda_arch_list, param_groups


def cfg_with(*overrides):
    return load_config(None, ["scaling.use_gpu=false", "model.dtype=fp32", *overrides], check_paths=False)


def test_zero3_fp32_cpu_config_has_no_optimizer_or_scheduler_block():
    ds = build_ds_config(cfg_with("deepspeed.zero_stage=3", "train.micro_batch_size=2",
                                  "train.gradient_accumulation_steps=4", "optim.max_grad_norm=0.5"))
    assert "optimizer" not in ds and "scheduler" not in ds  # ours are passed in; the config's schedule is honoured
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert "offload_optimizer" not in ds["zero_optimization"]


def test_zero2_bf16_and_fp16_loss_scaling():
    ds = build_ds_config(cfg_with("deepspeed.zero_stage=2", "model.dtype=bf16"))
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"]
    assert "stage3_param_persistence_threshold" not in ds["zero_optimization"]
    cfg = load_config(None, ["model.dtype=fp16", "scaling.use_gpu=true", "deepspeed.zero_stage=2"], check_paths=False)
    fp16 = build_ds_config(cfg)["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0 and fp16["initial_scale_power"] == 16  # dynamic scaling


def test_offload_blocks_and_torch_adam_escape_hatch():
    ds = build_ds_config(cfg_with("deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu",
                                  "deepspeed.offload_param=cpu"))
    z = ds["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert "zero_force_ds_cpu_optimizer" not in ds  # DeepSpeedCPUAdam by default
    ds = build_ds_config(cfg_with("deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu",
                                  "deepspeed.cpu_adam=false"))
    assert ds["zero_force_ds_cpu_optimizer"] is False


def test_param_offload_needs_zero3():
    with pytest.raises(ConfigError, match="offload_param"):
        cfg_with("deepspeed.zero_stage=2", "deepspeed.offload_param=cpu")


@pytest.mark.parametrize("stage", [0, 1])
def test_zero0_and_zero1_configs_have_no_stage3_or_offload_keys(stage):
    z = build_ds_config(cfg_with(f"deepspeed.zero_stage={stage}", "model.dtype=bf16"))["zero_optimization"]
    assert z["stage"] == stage
    assert not any(k.startswith("stage3_") or k.startswith("offload") for k in z)


@pytest.mark.parametrize("stage", [0, 1])
def test_optimizer_offload_needs_zero2_or_3(stage):
    with pytest.raises(ConfigError, match="offload_optimizer: needs zero_stage 2, 3 or auto"):
        cfg_with(f"deepspeed.zero_stage={stage}", "deepspeed.offload_optimizer=cpu")


def test_auto_stage_must_be_resolved_before_building_the_ds_config():
    cfg = cfg_with()  # the default is auto
    assert cfg.deepspeed.zero_stage == "auto" and cfg.model.gradient_checkpointing == "auto"
    with pytest.raises(ValueError, match="resolve 'auto'"):
        build_ds_config(cfg)


def test_unknown_stage_is_a_config_error():
    with pytest.raises(ConfigError, match="deepspeed.zero_stage: 4 is not one of 0, 1, 2, 3, 'auto'"):
        cfg_with("deepspeed.zero_stage=4")


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.input_layernorm = torch.nn.LayerNorm(4)
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_no_weight_decay_on_biases_and_norms_and_frozen_params_excluded():
    groups = param_groups(Tiny(), weight_decay=0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # proj.bias, norm weight + bias


def test_optimizer_is_torch_adamw_with_config_betas_eps():
    cfg = cfg_with("optim.adam_beta1=0.8", "optim.adam_beta2=0.9", "optim.adam_eps=1e-6", "optim.lr=3e-4")
    opt = build_optimizer(Tiny(), cfg)
    assert type(opt) is torch.optim.AdamW
    g = opt.param_groups[0]
    assert g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 and g["lr"] == 3e-4


def test_no_trainable_parameters_is_an_error():
    m = Tiny().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(m, cfg_with())


def test_cuda_arch_list_suffix_is_stripped(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    fix_cuda_arch_list()
    import os

    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"
