"""The shipped recipes (configs/*.yaml in the source tree, raytune_minicpmv/recipes/ in an installed wheel).

    raytune-minicpmv configs ls                        # name and first comment line of each recipe
    raytune-minicpmv configs cp minicpmv26_lora .      # ./minicpmv26_lora.yaml, ready to edit

pyproject.toml maps the source tree's configs/ to the package `raytune_minicpmv.recipes`, so the same files are found
after `pip install .` (no checkout) and in a checkout or editable install (configs/ next to the package).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path


def recipes_dir() -> Path:
    checkout = Path(__file__).resolve().parents[1] / "configs"
    if (checkout / "demo.yaml").is_file():
        return checkout
    return Path(__file__).resolve().parent / "recipes"


def recipe_path(name: str) -> Path:
    """A recipe by name (with or without .yaml); FileNotFoundError listing the names otherwise."""
    name = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    path = recipes_dir() / Path(name).name
    if not path.is_file():
        raise FileNotFoundError(f"no shipped recipe {name!r}; `raytune-minicpmv configs ls` lists: "
                                + ", ".join(p.stem for p in list_recipes()))
    return path


def list_recipes() -> list[Path]:
    return sorted(recipes_dir().glob("*.yaml"))


def _summary(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def configs_cmd(action: str, name: str | None, dest: str | None, force: bool = False) -> int:
    if action == "ls":
        recipes = list_recipes()
        width = max(len(p.stem) for p in recipes)
        for p in recipes:
            print(f"{p.stem:<{width}}  {_summary(p)}")
        print(f"(in {recipes_dir()}; copy one with `raytune-minicpmv configs cp NAME DEST`)", file=sys.stderr)
        return 0
    if not name or not dest:
        print("error: usage: raytune-minicpmv configs cp NAME DEST", file=sys.stderr)
        return 2
    try:
        src = recipe_path(name)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    target = Path(dest)
    if target.is_dir():
        target = target / src.name
    if target.exists() and not force:
        print(f"error: {target} exists (--force overwrites it)", file=sys.stderr)
        return 2
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    print(f"copied {src.name} to {target}; its relative paths resolve against {target.parent}")
    return 0
