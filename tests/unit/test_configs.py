"""Every shipped YAML in configs/ loads and validates (cluster-path recipes with check_paths=False)."""
from pathlib import Path

import pytest
import yaml

from raytune_minicpmv.config import load_config


def _is_run_config(path: Path) -> bool:
    """Our configs, not the Kubernetes manifests beside them (KubeRay RayJob: tested with the cluster files)."""
    raw = yaml.safe_load(path.read_text())
    return isinstance(raw, dict) and "apiVersion" not in raw and "kind" not in raw


CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml") if _is_run_config(p))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "minicpmv26_lora.yaml", "minicpmv26_full.yaml", "minicpmv26_lora_zero2.yaml",
            "minicpmv26_lora_zero3_offload.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_validates(path):
    cfg = load_config(path, check_paths=False)
    assert cfg.train.max_steps >= 1
    if path.name.startswith("minicpmv26") and "tune" not in path.name:
        assert cfg.model.family == "minicpmv2_6"
        # the corrected defaults: LoRA in the 1e-4 class, full fine-tuning in the 1e-5 .. 2e-6 class
        if cfg.trainable.llm == "lora":
            assert 5e-5 <= cfg.optim.lr <= 5e-4
        else:
            assert 1e-6 < cfg.optim.lr <= 2e-5


def test_demo_config_is_cpu_zero3_two_workers_with_room_for_ray_data():
    cfg = load_config(CONFIGS[0].parent / "demo.yaml", check_paths=False)
    assert (cfg.scaling.num_workers, cfg.scaling.use_gpu, cfg.deepspeed.zero_stage) == (2, False, 3)
    assert cfg.scaling.num_workers * cfg.scaling.cpus_per_worker < cfg.ray.num_cpus
    # relative defaults resolve next to the repository (the demo's output folder)
    assert cfg.model.path.endswith("demo_out/tiny-minicpmv2_6")


@pytest.mark.parametrize("name", ["minicpmv26_lora_recommended.yaml", "minicpmv26_full_recommended.yaml"])
def test_recommended_recipes_let_the_engine_choose_and_never_pin_zero3(name):
    cfg = load_config(CONFIGS[0].parent / name, check_paths=False)
    assert cfg.deepspeed.zero_stage == "auto" and cfg.model.gradient_checkpointing == "auto"
    assert cfg.data.preprocessed and cfg.train.micro_batch_size == 8 and cfg.train.logging_steps >= 10
    assert cfg.trainable.llm == ("lora" if "lora" in name else "full") and cfg.trainable.vision == "full"
