"""The merge stage: fold a trained adapter into its base checkpoint, verify, publish atomically.

    raytune-minicpmv merge --base BASE_DIR --adapter CKPT/adapter --out MERGED [-c cfg.yaml merge.dtype=bf16]

    from raytune_minicpmv.merge.merger import merge_adapter, run_merge
    merge_adapter(base, adapter, out, MergeConfig())   # in this process, no Ray
    run_merge(base, adapter, out, MergeConfig())       # the same as a Ray task with declared CPU/memory(/GPU)

The story of `merge_adapter`: a finished output (its manifest says so) is a no-op → index the base checkpoint and the
adapter (LoRA factors, fully trained `modules_to_save` copies, the old `vpm_resampler_embedtokens.pt`) → stream every
base tensor once, folding LoRA in fp32 or replacing it, into sharded safetensors in a temp dir next to the output →
copy every non-weight file of the base (config, tokenizer, processor, remote code) → verify the merged model's logits
against adapter-on-base on real samples → write the manifest last → rename the temp dir into place. A kill at any
point leaves at most the temp dir, which the next run deletes. Peak host memory is about one tensor plus the
adapter, not the model (see docs/MERGE.md and docs/PERFORMANCE.md).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import torch

from ..config import Config, MergeConfig, RayConfig
from .adapter import Adapter, read_adapter, merged_tensor
from ..models.registry import as_torch_dtype
from .safetensors_stream import CheckpointReader, plan_shards, write_sharded

log = logging.getLogger(__name__)

MANIFEST = "merge_manifest.json"
# Weight files of the base that the merge rewrites; every other file of the base directory is copied verbatim.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SKIP_DIRS = (".cache", ".git")


def merge_adapter(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  merge_cfg: MergeConfig = MergeConfig()) -> Path:
    """Merge `adapter_dir` into `base_dir` and publish a complete checkpoint at `out_dir`. Returns `out_dir`."""
    base_dir, out_dir = Path(base_dir).resolve(), Path(out_dir).resolve()
    adapter_dir = resolve_adapter_dir(adapter_dir)
    inputs = {"base": str(base_dir), "adapter": str(adapter_dir), "dtype": merge_cfg.dtype}
    if is_finished(out_dir, inputs):
        log.info("merge: %s is already complete; nothing to do", out_dir)
        return out_dir
    t0 = time.time()
    tmp = fresh_temp_dir(out_dir)
    quantized_base = base_dir
    base_dir = plain_base(base_dir, out_dir, merge_cfg)  # a bitsandbytes base: its dequantized copy
    base = CheckpointReader(base_dir)
    adapter = read_adapter(adapter_dir, set(base.keys()))
    log.info("merge: %d base tensors, %d LoRA targets, %d trained tensors replaced, dtype %s",
             len(base.entries), len(adapter.lora), len(adapter.replacements), merge_cfg.dtype)
    write_merged_weights(base, adapter, tmp, merge_cfg)
    copy_non_weight_files(base_dir, tmp, merge_cfg.dtype)
    verification = verify(base_dir, adapter_dir, tmp, merge_cfg)
    write_manifest(tmp, {**inputs, "verification": verification, "seconds": round(time.time() - t0, 1),
                         "dequantized_base": base_dir != quantized_base,
                         "host": socket.gethostname(), "pid": os.getpid(), "versions": _versions()})
    publish(tmp, out_dir)
    if base_dir != quantized_base:
        shutil.rmtree(base_dir, ignore_errors=True)
    log.info("merge: wrote %s in %.1f s", out_dir, time.time() - t0)
    return out_dir


def run_merge(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
              merge_cfg: MergeConfig | None = None, cfg: Config | None = None) -> Path:
    """`merge_adapter` as a Ray task declaring `merge.num_cpus`, `merge.num_gpus` and memory; starts Ray if needed.

    `cfg` (optional) only tells `init_ray` where Ray is; the standalone CLI has no run config, so a default one is used.
    """
    from ..cluster.ray_session import init_ray

    merge_cfg = merge_cfg or (cfg.merge if cfg else MergeConfig())
    cfg = cfg or Config()
    adapter_dir = resolve_adapter_dir(adapter_dir)
    out = Path(out_dir).resolve()
    if is_finished(out, {"base": str(Path(base_dir).resolve()), "adapter": str(adapter_dir),
                         "dtype": merge_cfg.dtype}):
        log.info("merge: %s is already complete; nothing to do", out)
        return out
    ray = init_ray(cfg)
    options = merge_task_options(base_dir, adapter_dir, merge_cfg, cfg.ray, ray.cluster_resources())
    task = ray.remote(_merge_task).options(**options)
    return Path(ray.get(task.remote(str(base_dir), str(adapter_dir), str(out), merge_cfg)))


def merge_task_options(base_dir, adapter_dir, merge_cfg: MergeConfig, ray_cfg: RayConfig,
                       cluster: dict[str, float]) -> dict:
    """The merge task's Ray options, given the cluster's resources (`ray.cluster_resources()`): `merge.num_cpus`,
    `merge.num_gpus`, the memory (`merge.memory_gb`, else the estimate capped at the cluster's Ray memory) and, for
    a CPU-only merge, one unit of the driver resource when the cluster has it (the CPU head, not a GPU node)."""
    from ..cluster.ray_session import driver_resources

    memory = int(merge_cfg.memory_gb * 2**30) if merge_cfg.memory_gb else estimate_memory_bytes(
        base_dir, adapter_dir, merge_cfg)
    available = cluster.get("memory", 0)
    if merge_cfg.memory_gb is None and available and memory > available:
        log.warning("merge: estimated %.1f GiB exceeds the cluster's %.1f GiB of Ray memory; declaring the latter "
                    "(set merge.memory_gb to override)", memory / 2**30, available / 2**30)
        memory = int(available)
    resources = driver_resources(ray_cfg, {}, cluster) if merge_cfg.num_gpus == 0 else {}
    log.info("merge: Ray task with %s CPU, %s GPU, %.2f GiB", merge_cfg.num_cpus, merge_cfg.num_gpus, memory / 2**30)
    return dict(num_cpus=merge_cfg.num_cpus, num_gpus=merge_cfg.num_gpus, memory=memory, resources=resources or None,
                max_retries=2,  # a lost node/worker is retried; the merge restarts cleanly from its temp dir
                retry_exceptions=False)  # a bad adapter or a failed verification fails the same way every time


def _merge_task(base_dir: str, adapter_dir: str, out_dir: str, merge_cfg: MergeConfig) -> str:
    logging.basicConfig(level=logging.INFO)
    return str(merge_adapter(base_dir, adapter_dir, out_dir, merge_cfg))


# --------------------------------------------------------------------------------------------------------------
# Steps


def resolve_adapter_dir(adapter_dir: str | os.PathLike) -> Path:
    """The adapter dir, or — for a full fine-tuning checkpoint that has no `adapter/` — its sibling `full_model/`."""
    path = Path(adapter_dir).resolve()
    if not path.exists() and (path.parent / "full_model").is_dir():
        return path.parent / "full_model"
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {path} does not exist")
    return path


def write_merged_weights(base: CheckpointReader, adapter: Adapter, out_dir: Path, merge_cfg: MergeConfig) -> Path:
    """Every base tensor, merged and cast, into `model-0000i-of-0000n.safetensors` + index. Returns the index."""
    out_dtype = as_torch_dtype(merge_cfg.dtype)
    for key, store_key in adapter.replacements.items():  # fail before writing anything
        if adapter.tensors.shape(store_key) != base.entry(key).shape:
            raise ValueError(f"{key}: trained copy has shape {adapter.tensors.shape(store_key)}, "
                             f"base has {base.entry(key).shape}")
    planned = [(e.key, e.shape, out_dtype if e.dtype.is_floating_point else e.dtype) for e in base.entries]
    plan = plan_shards(planned, parse_size(merge_cfg.max_shard_size))

    def produce(key: str) -> torch.Tensor:
        base_tensor = None if key in adapter.replacements else base.get(key)  # a replaced tensor is never read
        return merged_tensor(key, base_tensor, adapter, out_dtype)

    return write_sharded(out_dir, plan, produce)


def plain_base(base_dir: Path, out_dir: Path, merge_cfg: MergeConfig) -> Path:
    """The checkpoint to merge into: `base_dir` itself, or — for a bitsandbytes-quantized base (config.json
    `quantization_config`, e.g. openbmb/MiniCPM-V-2_6-int4) — its dequantized copy in `merge.dtype`, written to
    `.<name>.dequantized-base` next to the output and removed once the merge is published. LoRA cannot be folded
    into packed 4-bit integers without re-quantizing (which would lose most of the update), so the merged model is
    a plain checkpoint: the dequantized base weights + the adapter, verified against adapter-on-that-base."""
    from ..models.quantization import checkpoint_quantization, dequantize_checkpoint

    config = base_dir / "config.json"
    if not config.is_file() or checkpoint_quantization(json.loads(config.read_text())) is None:
        return base_dir
    work = out_dir.parent / f".{out_dir.name}.dequantized-base"
    if work.exists():
        shutil.rmtree(work)  # the leftovers of an interrupted merge
    log.warning("merge: %s is quantized (bitsandbytes); merging into its dequantized %s copy (the merged "
                "checkpoint is plain %s; to merge into the original bf16 weights, pass that checkpoint as --base)",
                base_dir, merge_cfg.dtype, merge_cfg.dtype)
    return dequantize_checkpoint(base_dir, work, as_torch_dtype(merge_cfg.dtype))


def copy_non_weight_files(base_dir: Path, out_dir: Path, dtype: str) -> list[str]:
    """Copy config, tokenizer, processor, generation config, remote code… — everything but the weights."""
    copied = []
    for src in sorted(base_dir.rglob("*")):
        rel = src.relative_to(base_dir)
        if src.is_dir() or rel.parts[0] in _SKIP_DIRS or src.name in _WEIGHT_INDEXES or src.suffix in _WEIGHT_SUFFIXES:
            continue
        dst = out_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        copied.append(str(rel))
    config = out_dir / "config.json"
    if config.is_file():  # the weights now have the merge dtype; say so where loaders look for it
        data = json.loads(config.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in data:
                data[key] = str(as_torch_dtype(dtype)).removeprefix("torch.")
        config.write_text(json.dumps(data, indent=2) + "\n")
    return copied


def verify(base_dir: Path, adapter_dir: Path, merged_dir: Path, merge_cfg: MergeConfig) -> dict:
    """Logits of merged vs adapter-on-base on `merge.verify_samples` samples (0 skips it, with a warning)."""
    if merge_cfg.verify_samples == 0:
        log.warning("merge: verification skipped (merge.verify_samples=0)")
        return {"skipped": True}
    from .verify import verify_merged

    return verify_merged(base_dir, adapter_dir, merged_dir, merge_cfg)


def write_manifest(tmp: Path, info: dict) -> None:
    """Written last, after every weight and file: its presence means the directory is complete."""
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    path = tmp / MANIFEST
    with open(path, "w") as f:
        json.dump({**info, "files": files}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def is_finished(out_dir: Path, inputs: dict) -> bool:
    """True when `out_dir` holds a finished merge of these inputs; raise when it holds something else."""
    if not out_dir.exists():
        return False
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        raise FileExistsError(f"{out_dir} exists but is not a finished merge (no {MANIFEST}); "
                              "remove it or choose another output path")
    done = json.loads(manifest.read_text())
    differs = {k: (done.get(k), v) for k, v in inputs.items() if done.get(k) != v}
    if differs:
        raise FileExistsError(f"{out_dir} holds a merge of other inputs ({differs}: (found, asked)); "
                              "remove it or choose another output path")
    missing = [f for f, size in done["files"].items() if not (out_dir / f).is_file()
               or (out_dir / f).stat().st_size != size]
    if missing:
        raise FileExistsError(f"{out_dir}: files changed or missing since the merge: {missing[:5]}; remove it")
    return True


def fresh_temp_dir(out_dir: Path) -> Path:
    """`.<name>.merging` next to the output (same filesystem, so the final rename is atomic), emptied first."""
    tmp = out_dir.parent / f".{out_dir.name}.merging"
    if tmp.exists():
        log.info("merge: removing the leftovers of an interrupted merge: %s", tmp)
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, out_dir: Path) -> None:
    os.rename(tmp, out_dir)  # atomic; fails if out_dir appeared meanwhile rather than mixing two merges
    fd = os.open(out_dir.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def estimate_memory_bytes(base_dir, adapter_dir, merge_cfg: MergeConfig) -> int:
    """Host memory to declare to Ray: the streaming merge needs ~1.5 × (largest base file + adapter); verification
    loads the model (in the merge dtype) once at a time, plus the adapter and activations."""
    base = CheckpointReader(base_dir)
    adapter = read_adapter(resolve_adapter_dir(adapter_dir), set(base.keys()))
    merge_phase = 1.5 * (base.largest_file_bytes + adapter.nbytes)
    itemsize = as_torch_dtype(merge_cfg.dtype).itemsize
    model_bytes = sum(e.nbytes if not e.dtype.is_floating_point else e.nbytes // e.dtype.itemsize * itemsize
                      for e in base.entries)
    if any(".quant_state." in e.key or e.key.endswith(".SCB") for e in base.entries):
        # a quantized base is dequantized first (whole model in memory): a packed byte holds up to 2 weights
        model_bytes = sum(e.nbytes * 2 * itemsize if not e.dtype.is_floating_point else
                          e.nbytes // e.dtype.itemsize * itemsize for e in base.entries)
    verify_phase = 1.3 * model_bytes + adapter.nbytes if merge_cfg.verify_samples else 0
    return int(max(merge_phase, verify_phase) + 512 * 2**20)  # + the interpreter, torch and transformers


def parse_size(size: str) -> int:
    """"500MB" / "2GB" → bytes (decimal units, as transformers' max_shard_size)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    size = size.strip().upper()
    return int(float(size[:-2]) * units[size[-2:]])


def _versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "peft", "safetensors")}

