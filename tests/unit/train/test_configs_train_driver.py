"""Driver-side checks of the training stage: they fail before any worker starts, naming the key and the fix."""
import pytest

from raytune_minicpmv.config import ConfigError, load_config
from raytune_minicpmv.train.trainer import check_cluster, check_driver
from raytune_minicpmv.train.worker import worker_config


def cfg(*overrides):
    return load_config(None, list(overrides), check_paths=False)


def test_gpu_workers_need_gpus_and_cpus():
    c = cfg("scaling.num_workers=4", "scaling.cpus_per_worker=8")
    check_cluster(c, {"CPU": 64.0, "GPU": 4.0})
    with pytest.raises(ConfigError) as e:
        check_cluster(c, {"CPU": 16.0, "GPU": 2.0})
    msg = str(e.value)
    assert "need 4 GPU, the cluster has 2" in msg and "need 32 CPU, the cluster has 16" in msg  # all at once
    check_cluster(cfg("scaling.num_workers=4", "scaling.check_resources=false"), {"CPU": 1.0})  # autoscaling


def test_cpu_workers_must_leave_room_for_ray_data():
    with pytest.raises(ConfigError, match="Ray Data"):
        check_cluster(cfg("scaling.use_gpu=false", "scaling.num_workers=2", "scaling.cpus_per_worker=1"),
                      {"CPU": 2.0})
    check_cluster(cfg("scaling.use_gpu=false", "scaling.num_workers=2", "scaling.cpus_per_worker=0.8"),
                  {"CPU": 2.0})


def test_unknown_family_and_missing_tracker_fail_in_the_driver():
    with pytest.raises(ConfigError) as e:
        check_driver(cfg("model.family=minicpmv9", "train.report_to=[wandb]"))
    msg = str(e.value)
    assert "model.family" in msg
    try:
        import wandb  # noqa: F401
    except ImportError:
        assert "train.report_to: wandb is not installed" in msg


def test_worker_config_applies_dotted_trial_overrides():
    base = cfg("optim.lr=1e-4").to_dict()
    c = worker_config({"config": base, "run_name": "t", "optim.lr": 3e-4, "lora.r": 16})
    assert c.optim.lr == 3e-4 and c.lora.r == 16
    assert base["optim"]["lr"] == 1e-4  # the driver's dict is not mutated
