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


ROOT = Path(__file__).resolve().parents[2]
RECIPES = [p for p in CONFIGS if p.name != "demo.yaml"]


def _cluster_mounts() -> set[str]:
    """Container paths that cluster.yaml mounts from the host's shared storage (`--volume HOST:CONTAINER`)."""
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    return {opt.split()[1].split(":")[1] for opt in cluster["docker"]["run_options"] if opt.startswith("--volume ")}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipes_do_not_pin_a_cluster_and_write_to_the_shared_mount(path, monkeypatch):
    """ray.address: auto would join any Ray on a laptop (or fail without one): recipes leave it unset. Their storage
    and input paths lie on cluster.yaml's shared mount, so checkpoints are visible from every node."""
    from raytune_minicpmv.cluster.ray_session import ray_address

    raw = yaml.safe_load(path.read_text())
    assert "address" not in (raw.get("ray") or {}), f"{path.name}: sets ray.address"
    cfg = load_config(path, check_paths=False)
    for key in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(key, raising=False)
    assert ray_address(cfg.ray) is None  # a new local Ray
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert ray_address(cfg.ray) == "auto"  # inside a Ray job: its cluster
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert ray_address(cfg.ray) == "10.0.0.5:6379"
    mounts = _cluster_mounts()
    assert mounts, "cluster.yaml mounts shared storage"
    for value in (cfg.run.storage_path, cfg.data.train_path, cfg.data.eval_path, cfg.model.path):
        assert any(value.startswith(m.rstrip("/") + "/") for m in mounts), f"{path.name}: {value} not under {mounts}"


def test_a_dashboard_url_in_ray_address_is_not_a_cluster_to_join(monkeypatch):
    from raytune_minicpmv.cluster.ray_session import ray_address

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # exported for `submit`
    assert ray_address(load_config(None, check_paths=False).ray) is None


@pytest.mark.parametrize("name,family,llm", [("minicpmv46_lora.yaml", "minicpmv4_6", "lora"),
                                             ("minicpmv47_lora.yaml", "minicpmv4_7", "lora"),
                                             ("minicpmv46_full.yaml", "minicpmv4_6", "full")])
def test_v4_recipes(name, family, llm):
    """4.6 / 4.7 recipes: their family, ZeRO-2 for a model this small, the lr class of the method, the family's LoRA
    targets (both layer kinds of the hybrid LLM), downsample 16x, and no packing (refused for hybrid LLMs)."""
    from raytune_minicpmv.models import FAMILIES

    cfg = load_config(ROOT / "configs" / name, check_paths=False)
    assert cfg.model.family == family and cfg.trainable.llm == llm
    assert cfg.deepspeed.zero_stage == 2 and cfg.model.downsample_mode == "16x"
    assert not getattr(cfg.data, "packing", False)
    if llm == "lora":
        assert 1e-4 <= cfg.optim.lr <= 3e-4 and cfg.trainable.resampler == "full"
        assert cfg.lora.target_modules == FAMILIES[family].lora_targets
    else:
        assert 1e-6 < cfg.optim.lr <= 2e-5 and cfg.trainable.embed_tokens == "full"
