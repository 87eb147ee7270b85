"""`pip install .` ships what `demo` and `configs ls|cp` need (issue 10 item 13): the wheel is built from this tree
and installed without dependencies into a temp dir; the commands then run from there, away from the checkout.

Run: .venv/bin/python -m pytest tests/unit/test_cli_package.py -q      (~15 s: builds the wheel)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: the build writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "demo_out",
                                                             "runs", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("raytune_minicpmv-*.whl"))
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    return target


def _run(installed: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed)}  # the installed copy, not this checkout
    return subprocess.run([sys.executable, "-m", "raytune_minicpmv.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_wheel_ships_every_module_and_the_recipes(installed):
    pkg = installed / "raytune_minicpmv"
    shipped = {p.relative_to(pkg).as_posix() for p in pkg.rglob("*") if p.is_file()}
    source = {p.relative_to(ROOT / "raytune_minicpmv").as_posix() for p in (ROOT / "raytune_minicpmv").rglob("*.py")}
    assert source <= shipped, f"modules missing from the wheel (list new subpackages in pyproject): {source - shipped}"
    recipes = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert {f"recipes/{r}" for r in recipes} <= shipped
    assert "cluster/ray_data_logging_quiet.yaml" in shipped


def test_configs_ls_and_cp_work_from_the_installed_package(installed, tmp_path):
    ls = _run(installed, "configs", "ls", cwd=tmp_path)
    assert ls.returncode == 0, ls.stderr
    names = {line.split()[0] for line in ls.stdout.splitlines()}
    assert {"demo", "minicpmv26_lora", "minicpmv26_tune"} <= names
    assert str(installed) in ls.stderr  # read from the installed package, not a checkout
    cp = _run(installed, "configs", "cp", "minicpmv26_lora", "mine.yaml", cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    assert (tmp_path / "mine.yaml").read_text() == (ROOT / "configs" / "minicpmv26_lora.yaml").read_text()
    again = _run(installed, "configs", "cp", "minicpmv26_lora", "mine.yaml", cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr
    missing = _run(installed, "configs", "cp", "nope", "x.yaml", cwd=tmp_path)
    assert missing.returncode == 2 and "minicpmv26_lora" in missing.stderr


def test_demo_finds_its_recipe_in_the_installed_package(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    # everything `demo` does before it starts Ray: tiny model + sample data, then its recipe loads and validates
    code = ("from pathlib import Path; from raytune_minicpmv.demo import DEMO_CONFIG, prepare_demo_inputs; "
            "from raytune_minicpmv.config import load_config; "
            "inputs = prepare_demo_inputs(Path('out').resolve()); "
            "cfg = load_config(DEMO_CONFIG, [f'{k}={v}' for k, v in inputs.items()]); print(DEMO_CONFIG)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.is_relative_to(installed)
    assert (tmp_path / "out" / "tiny-minicpmv2_6" / "config.json").is_file()
