"""jobs.py building blocks without a cluster: address, token lookup, runtime env, entrypoint checks; and the job-env
merge rule of cluster.init_ray. The real submissions are in tests/integration/test_multinode.py.

Run: .venv/bin/python -m pytest tests/unit/test_jobs.py -q
"""
from __future__ import annotations

import json
import pytest

from raytune_minicpmv import cluster, jobs
from raytune_minicpmv.config import load_config


@pytest.fixture
def fresh_token_cache():
    """Ray caches the token it found in-process; forget it after the test (and after monkeypatch restored the
    environment), so later tests that start a local Ray read the real one."""
    yield
    from ray._raylet import AuthenticationTokenLoader

    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture
def clean_env(fresh_token_cache, monkeypatch, tmp_path):
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE",
                "RAY_JOB_CONFIG_JSON_ENV_VAR", "NCCL_DEBUG", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.ray/auth_token of this machine
    return monkeypatch


def test_address_precedence(clean_env):
    assert jobs.resolve_address(None) == "http://127.0.0.1:8265"
    clean_env.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address is for ray.init, not for the Jobs API
    assert jobs.resolve_address(None) == "http://127.0.0.1:8265"
    clean_env.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    assert jobs.resolve_address(None) == "http://10.0.0.1:8265"
    clean_env.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.2:8265")
    assert jobs.resolve_address(None) == "http://10.0.0.2:8265"
    assert jobs.resolve_address("http://h:1") == "http://h:1"


def test_token_is_found_like_ray_finds_it(clean_env, tmp_path):
    assert jobs.auth_headers() == {}
    home_token = tmp_path / "home" / ".ray" / "auth_token"
    home_token.parent.mkdir(parents=True)
    home_token.write_text("from-home")
    assert jobs.auth_headers() == {"authorization": "Bearer from-home"}
    path_token = tmp_path / "tok"
    path_token.write_text("from-path")
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(path_token))
    assert jobs.auth_headers() == {"authorization": "Bearer from-path"}
    clean_env.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.auth_headers() == {"authorization": "Bearer from-env"}


def test_runtime_env_uploads_the_project_and_forwards_cluster_settings(clean_env, tmp_path):
    clean_env.setenv("NCCL_DEBUG", "INFO")
    clean_env.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "1200")
    clean_env.setenv("SOME_PRIVATE_THING", "x")
    env = jobs.build_runtime_env(tmp_path, ["HF_HUB_OFFLINE=1", "A=b=c"])
    assert env["working_dir"] == str(tmp_path)
    assert {".venv", ".git", "runs"} <= set(env["excludes"])
    assert env["env_vars"]["NCCL_DEBUG"] == "INFO"
    assert env["env_vars"]["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "1200"
    assert env["env_vars"]["A"] == "b=c" and env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert "SOME_PRIVATE_THING" not in env["env_vars"]
    with pytest.raises(jobs.JobError, match="KEY=VALUE"):
        jobs.build_runtime_env(tmp_path, ["novalue"])


def test_entrypoint_config_must_travel_with_the_working_dir(tmp_path):
    wd = tmp_path / "proj"
    (wd / "configs").mkdir(parents=True)
    (wd / "configs" / "x.yaml").write_text("run: {name: x}\n")
    (tmp_path / "outside.yaml").write_text("run: {name: y}\n")
    jobs.check_entrypoint(["raytune-minicpmv", "tune", "--config", "configs/x.yaml"], wd)
    jobs.check_entrypoint(["python", "-c", "print(1)"], wd)  # not ours: -c is python's
    with pytest.raises(jobs.JobError, match="nothing to run"):
        jobs.check_entrypoint([], wd)
    with pytest.raises(jobs.JobError, match="no such file"):
        jobs.check_entrypoint(["raytune-minicpmv", "train", "-c", "configs/missing.yaml"], wd)
    with pytest.raises(jobs.JobError, match="outside the working dir"):
        jobs.check_entrypoint(["raytune-minicpmv", "train", "--config", "../outside.yaml"], wd)


def test_submit_refuses_a_bad_entrypoint_before_contacting_the_cluster(clean_env, tmp_path, capsys):
    from raytune_minicpmv.cli import main

    rc = main(["submit", "--address", "http://127.0.0.1:9", "--working-dir", str(tmp_path), "--",
               "raytune-minicpmv", "tune", "--config", "nope.yaml"])
    assert rc == 2
    assert "no such file" in capsys.readouterr().err


def test_unreachable_cluster_is_a_clear_error(clean_env, tmp_path, capsys):
    from raytune_minicpmv.cli import main

    # a token is at hand: after a token-auth Ray ran in this process, Ray's client refuses early without one
    clean_env.setenv("RAY_AUTH_TOKEN", "t" * 32)
    rc = main(["status", "raysubmit_x", "--address", "http://127.0.0.1:9"])
    assert rc == 2
    assert "127.0.0.1:9" in capsys.readouterr().err


def test_job_env_wins_over_the_config_inside_a_submitted_job(clean_env):
    cfg = load_config(None, ["scaling.use_gpu=false", "ray.worker_group_start_timeout_s=600"], check_paths=False)
    ours = cluster.runtime_env_vars(cfg)
    assert ours["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "600" and ours["DS_ACCELERATOR"] == "cpu"
    assert cluster._without_job_env_vars(ours) == ours  # not in a job: nothing dropped
    job_config = {"runtime_env": {"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "1200",
                                               "PYTHONUNBUFFERED": "1"}}}
    clean_env.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job_config))
    merged = cluster._without_job_env_vars(ours)
    # Ray refuses to merge a job env and a ray.init env that set the same key; the submit-time value wins.
    assert "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" not in merged and "PYTHONUNBUFFERED" not in merged
    assert merged["DS_ACCELERATOR"] == "cpu"
