"""Loading a config: YAML file + dotted overrides → the typed `Config` (schema.py), validated (validation.py).

    cfg = config_from_dict(raw, base_dir="configs")     # what load_config does after reading the file

The rules (override syntax, which paths resolve against the file and which against the current directory, every
problem at once) are described in the package docstring (`raytune_minicpmv/config/__init__.py`).
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .schema import Config, ConfigError, is_uri
from .validation import validate


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                check_paths: bool = True) -> Config:
    """Read YAML (or defaults when path is None), apply ``a.b=value`` overrides, build and validate."""
    raw: dict = {}
    base_dir = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file {path} does not exist"])
        raw = _read_yaml(path)
        base_dir = path.resolve().parent
    problems: list[str] = []
    overridden: set[str] = set()
    for ov in overrides:
        _apply_override(raw, ov, problems)
        overridden.add(ov.split("=", 1)[0].strip())
    cfg = _build(Config, raw, "", problems)
    if cfg is not None:
        # file paths against the file's directory, command-line paths against the current directory
        cfg = _resolve_paths(cfg, base_dir, overridden)
        problems += validate(cfg, check_paths=check_paths)
    if problems:
        raise ConfigError(problems)
    return cfg


def _read_yaml(path: Path) -> dict:
    """The file's mapping; a syntax error is a ConfigError naming file:line:column, not a parser traceback."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        parts, first = [], None
        for text, mark in ((getattr(e, "context", None), getattr(e, "context_mark", None)),
                           (getattr(e, "problem", None), getattr(e, "problem_mark", None))):
            if text and mark is not None:
                first = first or mark
                parts.append(f"{text} (line {mark.line + 1}, column {mark.column + 1})")
        where = f"{path}:{first.line + 1}" if first is not None else str(path)
        raise ConfigError([f"{where}: YAML syntax error: {': '.join(parts) or e}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: top level must be a mapping of sections"])
    return raw


def config_from_dict(raw: dict, base_dir: str | os.PathLike | None = None, check_paths: bool = True) -> Config:
    """Same as `load_config` for an in-memory mapping (used by workers and tests)."""
    problems: list[str] = []
    cfg = _build(Config, raw, "", problems)
    if cfg is not None and base_dir is not None:
        cfg = _resolve_paths(cfg, Path(base_dir))
    if cfg is not None:
        problems += validate(cfg, check_paths=check_paths)
    if problems:
        raise ConfigError(problems)
    return cfg


def replace(cfg: Config, **sections: dict) -> Config:
    """Return a copy of cfg with some fields of some sections replaced: replace(cfg, optim={"lr": 1e-4})."""
    return dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in sections.items()})


def _apply_override(raw: dict, override: str, problems: list[str]) -> None:
    if "=" not in override:
        problems.append(f"override {override!r}: expected key.path=value")
        return
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            problems.append(f"override {override!r}: {p} is not a section")
            return
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        problems.append(f"override {override!r}: the value is not valid YAML ({getattr(e, 'problem', e)})")


def _build(cls, raw: Any, prefix: str, problems: list[str]):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        section = prefix.rstrip(".")
        problems.append(f"{section or '<top>'}: expected a section of keys, got {raw!r}"
                        + (f" (set its keys: {section}.KEY=VALUE)" if section else ""))
        return None
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in raw:
        if key not in known:
            near = _closest(key, known)
            problems.append(f"{prefix}{key}: unknown key" + (f" (did you mean {prefix}{near}?)" if near else "")
                            + f"; allowed: {', '.join(sorted(known))}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        value, ok = _coerce(hints[f.name], raw[f.name], f"{prefix}{f.name}", problems)
        if ok:
            kwargs[f.name] = value
    return cls(**kwargs)


def _coerce(tp, value, key: str, problems: list[str]):
    """Check/convert one value against a type hint. Returns (value, ok)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        built = _build(tp, value, key + ".", problems)  # None (problem reported) for e.g. the override `train=5`
        return built, built is not None
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None, True
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, problems)
    if origin is Literal:
        if value in args:
            return value, True
        problems.append(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return None, False
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {value!r}")
            return None, False
        out = [_coerce(args[0], v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return [v for v, _ in out], all(ok for _, ok in out)
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return None, False
        out = {k: _coerce(args[1], v, f"{key}.{k}", problems) for k, v in value.items()}
        return {k: v for k, (v, _) in out.items()}, all(ok for _, ok in out.values())
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), True
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value), True
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, True
    elif tp is bool:
        if isinstance(value, bool):
            return value, True
    elif tp is str:
        if isinstance(value, str):
            return value, True
    else:
        return value, True
    problems.append(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return None, False


def _closest(key: str, options: set[str]) -> Optional[str]:
    import difflib

    m = difflib.get_close_matches(key, sorted(options), n=1, cutoff=0.6)
    return m[0] if m else None


PATH_KEYS = ("run.storage_path", "data.train_path", "data.eval_path", "data.output_path", "data.tokenizer_path",
             "model.path", "merge.output_path")


def _resolve_paths(cfg: Config, base: Path, from_cwd: set[str] = frozenset()) -> Config:
    """Relative paths made absolute: against `base`, or against the CWD for the keys in `from_cwd` (overrides)."""
    sections: dict[str, dict] = {}
    for key in PATH_KEYS:
        section, name = key.split(".")
        p = getattr(getattr(cfg, section), name)
        if p and not is_uri(p) and not os.path.isabs(p):
            p = str(((Path.cwd() if key in from_cwd else base) / p).resolve())
        sections.setdefault(section, {})[name] = p
    return replace(cfg, **sections)


