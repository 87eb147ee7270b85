"""jobs.py building blocks without a cluster: address, token lookup, runtime env, entrypoint checks; and the job-env
merge rule of cluster.init_ray. The real submissions are in tests/integration/test_multinode.py.

Run: .venv/bin/python -m pytest tests/unit/cluster/test_jobs.py -q
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from raytune_minicpmv.cluster import jobs
from raytune_minicpmv.cluster import ray_session as cluster
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
    assert {".venv", ".git", "runs/"} <= set(env["excludes"])
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


def _user_tree(root: Path) -> Path:
    """A project directory as users have them: code, a config, secrets, data, checkpoints, an environment."""
    files = {
        "train_me.py": "print('hi')\n", "configs/x.yaml": "run: {name: x}\n", "README.md": "# proj\n",
        "pkg/__init__.py": "", "pkg/tokenizer.json": "{}",
        ".env": "HF_TOKEN=secret\n", ".aws/credentials": "[default]\n", ".ssh/id_rsa": "KEY\n", ".netrc": "machine\n",
        "certs/server.pem": "PEM\n", "data/train.parquet": "PAR1", "data/img/0001.png": "PNG", "data/a.jpg": "JPG",
        "ckpt/model.pth": "W", "ckpt/last.ckpt": "W", "models/m.gguf": "W", "ckpt/model.safetensors": "W",
        ".venv/bin/python": "", ".git/HEAD": "ref\n", "scratch/notes.txt": "private\n", "keep.log": "log\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / ".gitignore").write_text("scratch/\n*.log\n")
    return root


CODE = {"train_me.py", "configs/x.yaml", "README.md", "pkg/__init__.py", "pkg/tokenizer.json", ".gitignore"}


def test_the_uploaded_package_holds_code_but_no_secrets_data_checkpoints_or_gitignored_files(clean_env, tmp_path):
    """Ray's own packager (what JobSubmissionClient zips and uploads) with our runtime env's excludes."""
    from ray._private.runtime_env.packaging import create_package

    root = _user_tree(tmp_path / "proj")
    env = jobs.build_runtime_env(root, [])
    pkg = tmp_path / "pkg.zip"
    create_package(str(root), pkg, include_gitignore=True, excludes=env["excludes"])
    names = {n.rstrip("/") for n in zipfile.ZipFile(pkg).namelist() if not n.endswith("/")}
    assert names == CODE
    # the listing printed before the upload is exactly that package
    from raytune_minicpmv.cluster.job_upload import plan_upload

    plan = plan_upload(root, env["excludes"])
    assert {p for p, _ in plan.files} == CODE
    assert plan.summary().startswith(f"uploading {len(CODE)} files, ")


def test_submit_dry_run_lists_the_upload_and_extra_excludes_apply(clean_env, tmp_path, capsys):
    from raytune_minicpmv.cli import main

    root = _user_tree(tmp_path / "proj")
    rc = main(["submit", "--dry-run", "--working-dir", str(root), "--exclude", "README.md", "--",
               "raytune-minicpmv", "tune", "--config", "configs/x.yaml"])
    out = capsys.readouterr()
    assert rc == 0
    listed = {line.split()[-1] for line in out.out.splitlines()}
    assert listed == CODE - {"README.md"}
    assert f"would upload {len(CODE) - 1} files" in out.err


def test_an_oversized_working_dir_is_refused_before_any_upload_with_the_reason(clean_env, tmp_path, capsys):
    from raytune_minicpmv.cli import main
    from raytune_minicpmv.cluster.job_upload import MAX_UPLOAD_BYTES

    root = tmp_path / "proj"
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "x.yaml").write_text("run: {name: x}\n")
    import os

    (root / "blob.dat").write_bytes(os.urandom(MAX_UPLOAD_BYTES + 1024))  # incompressible, not a known data suffix
    # the address is never contacted: nothing listens there, and the refusal names the size, not a connection
    rc = main(["submit", "--address", "http://127.0.0.1:9", "--working-dir", str(root), "--",
               "raytune-minicpmv", "tune", "--config", "configs/x.yaml"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "over the 100.0 MiB the Ray Jobs API accepts" in err and "blob.dat (100.0 MiB)" in err
    assert "127.0.0.1:9" not in err


def test_the_address_flag_wins_over_ray_address_and_an_unreachable_one_fails_in_seconds(clean_env, tmp_path):
    """RAY_ADDRESS (a GCS address of some other cluster) must not replace --address; a dead address is an error
    message within seconds, not a 40 s hang and a traceback. A subprocess: the hang would otherwise block pytest."""
    env = {**__import__("os").environ, "RAY_ADDRESS": "10.255.255.1:6379", "RAY_AUTH_TOKEN": "t" * 32}
    t0 = time.monotonic()
    try:
        out = subprocess.run([sys.executable, "-m", "raytune_minicpmv.cli", "status", "raysubmit_x", "--address",
                              "127.0.0.1:9"], env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("status --address hung for 30 s with RAY_ADDRESS set")
    assert time.monotonic() - t0 < 20
    assert out.returncode == 2, out.stderr
    assert "cannot reach the Ray Jobs API at http://127.0.0.1:9" in out.stderr
    assert "10.255.255.1" not in out.stderr and "Traceback" not in out.stderr
