"""configs/kuberay-rayjob.yaml: the same invariants as cluster.yaml, in KubeRay's terms.

Run: .venv/bin/python -m pytest tests/unit/cluster/test_kuberay.py -q
"""
from __future__ import annotations

import json
import shlex
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from raytune_minicpmv.config import RayConfig, load_config

ROOT = Path(__file__).resolve().parents[3]
SHARED = "/mnt/shared"


@pytest.fixture(scope="module")
def job() -> dict:
    return yaml.safe_load((ROOT / "configs" / "kuberay-rayjob.yaml").read_text())


def _pods(job):
    spec = job["spec"]["rayClusterSpec"]
    yield "head", spec["headGroupSpec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group


def test_it_is_a_rayjob_running_our_tune_entry_with_a_shipped_config(job):
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["raytune-minicpmv", "tune", "--config"]
    image_path = Path(argv[3])
    assert image_path.parts[:3] == ("/", "app", "configs"), "configs are baked into the image under /app/configs"
    local = ROOT / "configs" / image_path.relative_to("/app/configs")
    cfg = load_config(local, argv[4:], check_paths=False)
    assert cfg.run.storage_path.startswith(SHARED + "/"), "results must go to the shared volume"
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_driver_lands_on_the_cpu_head(job):
    driver = RayConfig().driver_resource
    assert json.loads(job["spec"]["entrypointResources"]) == {driver: 1}
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert head["num-gpus"] == "0"
    # KubeRay passes the value through to `ray start --resources=...` with its quotes.
    assert json.loads(json.loads(head["resources"]))[driver] >= 10


def test_gpu_workers_autoscale_from_zero(job):
    spec = job["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["replicas"] == 0, group["groupName"]
        assert group["maxReplicas"] >= 1, group["groupName"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, group["groupName"]


def test_token_auth_and_versions(job):
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token"
    assert spec["rayVersion"] == version("ray"), "KubeRay's rayVersion must match the image and the client"


def test_every_pod_mounts_the_same_shared_volume(job):
    claims = set()
    for name, group in _pods(job):
        pod = group["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod["volumes"]}
        shared = [v for v, path in mounts.items() if path == SHARED]
        assert shared, f"{name}: no volume at {SHARED}"
        claims.add(volumes[shared[0]]["persistentVolumeClaim"]["claimName"])
    assert len(claims) == 1, f"head and workers must mount one ReadWriteMany claim, got {claims}"


def test_runtime_env_raises_the_worker_group_start_timeout(job):
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert float(env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]) >= 300
