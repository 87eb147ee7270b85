"""Up-front checks of the local filesystem for a config (called by `config.validate` when check_paths is on).

They run in the driver before Ray starts, so a typo fails in a second with the key to fix instead of 15-37 s later
inside a Ray worker with a traceback. URIs (s3://, gs://) are checked by whoever opens them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional


def is_uri(path: str) -> bool:
    return "://" in path


DATA_SUFFIXES = (".json", ".jsonl", ".parquet")  # what records.read_raw_records reads (by suffix; JSON otherwise)


def data_file_problems(key: str, path: Optional[str]) -> list[str]:
    if not path or is_uri(path) or not os.path.exists(path):
        return []  # absence is reported by the existence rule
    if not os.path.isfile(path):
        return [f"{key}: {path} is a directory; give the data file itself ({', '.join(DATA_SUFFIXES)})"]
    return []


def storage_problems(path: str) -> list[str]:
    """run.storage_path must be a writable directory, or creatable under a writable one."""
    if not path or (is_uri(path) and not path.startswith("file://")):
        return []
    path = path[len("file://"):] if path.startswith("file://") else path
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return [f"run.storage_path: {probe} is a file, not a directory; point run.storage_path at a directory"]
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == Path(path) else f"cannot be created: {probe} is not writable"
        return [f"run.storage_path: {path} {what} by this user; choose a directory you can write "
                "(checkpoints, Tune results and the merged model go there)"]
    return []


WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")


def weights_problems(path: str) -> list[str]:
    """model.path holds weights: for the commands that load the model (the data stage needs only config.json and
    the tokenizer, so `preprocess` runs on a tokenizer-only directory)."""
    if not path or is_uri(path) or not os.path.isdir(path):
        return []
    if any(next(Path(path).glob(g), None) for g in WEIGHT_GLOBS):
        return []
    return [f"model.path: {path} holds no weights (*.safetensors or pytorch_model*.bin): train, tune and validate "
            "need the full checkpoint directory"]


def checkpoint_problems(path: str, family: str) -> list[str]:
    """model.path: a directory with config.json, of the family model.family names."""
    if not path or is_uri(path) or not os.path.exists(path):
        return []
    key = "model.path"
    ckpt = Path(path)
    if not ckpt.is_dir():
        return [f"{key}: {path} is a file; give the checkpoint directory (config.json + weights)"]
    problems: list[str] = []
    if not (ckpt / "config.json").is_file():
        return problems + [f"{key}: {path} has no config.json (expected a Hugging Face checkpoint directory)"]
    try:
        raw = json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError) as e:
        return problems + [f"{key}: {path}/config.json is not valid JSON ({e})"]
    from .models.registry import detect_family  # torch + transformers: only when there is a checkpoint to check

    found = detect_family(raw) if isinstance(raw, dict) else None
    if found is not None and found != family:
        # the family picks the chat template and the model class: a mismatch would silently train the wrong format
        problems.append(f"model.family: {family!r}, but {path}/config.json is a {found} checkpoint "
                        f"(model_type={raw.get('model_type')!r}, version={raw.get('version')!r}); set "
                        f"model.family={found}")
    return problems


def packing_problems(family: str) -> list[str]:
    """data.packing: the model family must train on packed rows (models.packing.packing_refusal decides)."""
    from .models.packing import packing_refusal  # torch + transformers: only when packing is asked for

    why = packing_refusal(family)
    return [f"data.packing: model family {family} cannot train on packed rows ({why}); set data.packing=false"] \
        if why else []


def quantized_checkpoint_problems(path: str, quantization: str, vision: str) -> list[str]:
    """model.quantization against the environment and model.path's config.json (a pre-quantized checkpoint)."""
    from .models.quantization import INSTALL_HINT, bitsandbytes_available, checkpoint_quantization

    problems = [] if quantization == "none" or bitsandbytes_available() else [
        f"model.quantization: {quantization} needs bitsandbytes: {INSTALL_HINT}"]
    cfg_path = Path(path) / "config.json" if path and not is_uri(path) else None
    if cfg_path is None or not cfg_path.is_file():
        return problems
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return problems  # checkpoint_problems reports it
    found = checkpoint_quantization(raw) if isinstance(raw, dict) else None
    if found is not None and found != quantization:
        problems.append(f"model.quantization: {quantization}, but {path} is pre-quantized as {found} (config.json "
                        f"quantization_config); set model.quantization={found}" if found in ("nf4", "int8") else
                        f"model.path: {path} is quantized as {found}; only bitsandbytes nf4/int8 checkpoints load")
    skip = (raw.get("quantization_config") or {}).get("llm_int8_skip_modules") or [] if found else None
    if found and vision == "full" and not any(s in ("vpm", "vpm.") for s in skip):
        problems.append(f"trainable.vision: full, but {path} stores its vision tower's linear layers quantized "
                        f"(llm_int8_skip_modules {skip} does not keep vpm); use trainable.vision=lora or frozen, "
                        "or start from the bf16 checkpoint with model.quantization=" + quantization)
    return problems


def merge_input_problems(base: str, adapter: str, out: str) -> list[str]:
    """`raytune-minicpmv merge` inputs, checked before Ray starts."""
    problems = []
    if not os.path.isdir(base):
        problems.append(f"--base {base}: no such checkpoint directory")
    else:
        problems += [p.replace("model.path", "--base") for p in weights_problems(base)]
        if not os.path.isfile(os.path.join(base, "config.json")):
            problems.append(f"--base {base}: no config.json (expected a Hugging Face checkpoint directory)")
    if not os.path.isdir(adapter):
        problems.append(f"--adapter {adapter}: no such directory")
    if os.path.exists(out) and not os.path.isdir(out):
        problems.append(f"--out {out}: exists and is not a directory")
    return problems


def infer_input_problems(model: str, adapter: Optional[str], images: list[str] = (), data: Optional[str] = None,
                         out: Optional[str] = None) -> list[str]:
    """`chat` / `predict` inputs, checked before a model is loaded (or Ray started)."""
    problems = []
    if not model or not os.path.isdir(model):
        problems.append(f"--model {model}: no such checkpoint directory")
    else:
        problems += [p.replace("model.path", "--model") for p in weights_problems(model)]
        if not os.path.isfile(os.path.join(model, "config.json")):
            problems.append(f"--model {model}: no config.json (expected a Hugging Face checkpoint directory)")
    if adapter is not None and not os.path.isdir(adapter):
        problems.append(f"--adapter {adapter}: no such directory")
    problems += [f"--image {p}: no such file" for p in images if not os.path.isfile(p)]
    if data is not None:
        problems += data_file_problems("--data", data) if os.path.exists(data) else [f"--data {data}: no such file"]
    if out is not None and os.path.isdir(out):
        problems.append(f"--out {out}: is a directory; give the predictions file (JSON lines)")
    return problems


def user_error_types(merge: bool = False) -> tuple[type, ...]:
    """Exceptions that are the user's to fix: printed as a message without a traceback (the CLI's --debug shows it).

    Bad config, bad data (on_bad_record=error, the skip cap, an empty split), an unusable checkpoint or adapter, a failed merge
    check; for `merge` also its input errors (missing files, an output of other inputs, an adapter that does not fit).
    """
    from .config import ConfigError
    from .merge.adapter import UnsupportedAdapterError
    from .merge.verify import MergeVerificationError
    from .models.registry import CheckpointError
    from .data.pipeline import SplitError
    from .data.records import BadDataError, BadRecord

    types: tuple[type, ...] = (ConfigError, BadDataError, BadRecord, SplitError, CheckpointError,
                               UnsupportedAdapterError, MergeVerificationError)
    return types + ((FileNotFoundError, FileExistsError, ValueError) if merge else ())
