"""Training metrics: the FLOP model, the peak-FLOPs table, the throughput/MFU meter, trackers and the run report.

    from raytune_minicpmv.train.metrics import FlopModel, StepCounts, ThroughputMeter, peak_flops
    fm = FlopModel.from_model(model, gradient_checkpointing=True)
    meter = ThroughputMeter(fm, peak_flops(), world_size)
    meter.start()                                          # (re)start the clock right before the first step
    meter.add_step(counts, step_s=..., data_wait_s=...)    # counts: global StepCounts of one optimizer step
    meter.snapshot()  # -> {"tokens_per_s": ..., "mfu": ..., ...}, then starts a new window

Rates are over WALL-CLOCK time between step ends, not over the time spent inside the step: whatever happens between
two steps (logging, evaluation, checkpoint saves, Ray Train reports waiting for the controller) slows the run, so
it lowers tokens/s and MFU too. `overhead_frac` says how much of the window was spent outside the steps.

FLOP formula (model FLOPs, forward + backward, per optimizer step, summed over all ranks)::

    LLM       F_llm = 2·N_llm·T + 2·n_layers·d·Σ L_i²      (T real tokens, L_i sample lengths; causal attention:
                                                          QKᵀ and AV are 2·L²·d each, halved by the causal mask)
    vision    F_vpm = 2·N_vpm·P + 4·n_vlayers·d_v·Σ P_c²   (P patches, P_c patches of crop c; full attention)
    resampler F_res = 2·N_res·P                           (upper bound: its kv side runs once per patch)
    backward of a part = F_part (activation gradients, if anything trainable sits in or before it)
                       + 2·N_trainable_part·tokens_part   (weight gradients only for trainable tensors)

N counts matmul weights (input embeddings excluded; lm_head included). ZeRO-3 partitioned tensors are counted by
their full size (``ds_numel``). MFU = model FLOPs / wall-clock time / (world size × the card's dense bf16 peak).
Gradient-checkpointing recompute (one more forward of the checkpointed parts) is NOT counted: MFU measures useful
work, so recompute shows up as a lower MFU, as in the PaLM definition. On CPU the peak is unknown and MFU is 0.
"""
from __future__ import annotations

import dataclasses
import logging
import resource
import time
from dataclasses import dataclass
from typing import Optional

import torch

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peak per card (no sparsity), FLOP/s, from the vendors' datasheets. Matched by substring of
# torch.cuda.get_device_name(), first match wins (so the more specific names come first).
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("H20", 148e12),
    ("B200", 2250e12),
    ("GB200", 2500e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("V100", 125e12),  # fp16: V100 has no bf16
    ("T4", 65e12),  # fp16
]


def peak_flops(device_name: Optional[str] = None) -> float:
    """The card's dense bf16 peak in FLOP/s; 0.0 on CPU or for an unknown card (MFU is then reported as 0)."""
    if device_name is None:
        if not torch.cuda.is_available():
            return 0.0
        device_name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_FLOPS:
        if key in device_name:
            return value
    log.warning("unknown GPU %r: MFU will be reported as 0 (add it to metrics.PEAK_BF16_FLOPS)", device_name)
    return 0.0


def _numel(p: torch.nn.Parameter) -> int:
    quant = getattr(p, "quant_state", None)  # a bitsandbytes 4-bit weight packs 2 weights per byte: count weights
    if quant is not None and getattr(quant, "shape", None) is not None:
        return int(torch.Size(quant.shape).numel())
    return int(getattr(p, "ds_numel", p.numel()))


_V4_PARTS = (("llm", "model.language_model."), ("llm", "lm_head."), ("resampler", "model.merger."),
             ("resampler", "model.vision_tower.vit_merger."), ("vpm", "model.vision_tower."))  # 4.6 / 4.7 layout


def _part_of(name: str) -> Optional[str]:
    bare = name.removeprefix("base_model.model.").removeprefix("module.")
    for part, prefix in _V4_PARTS:
        if bare.startswith(prefix):
            return part
    for part in ("llm", "vpm", "resampler"):
        if name.startswith(part + ".") or f".{part}." in name:
            return part
    return None


@dataclass
class FlopModel:
    """Parameter counts per part (matmul weights only) and the dims the attention terms need."""

    n_params: dict  # part -> total matmul weights
    n_trainable: dict  # part -> trainable weights
    llm_layers: int = 0
    llm_hidden: int = 0
    vision_layers: int = 0
    vision_hidden: int = 0

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "FlopModel":
        total = {"llm": 0, "vpm": 0, "resampler": 0}
        trainable = dict(total)
        for name, p in model.named_parameters():
            part = _part_of(name)
            if part is None or "embed_tokens" in name or "position_embedding" in name or "modules_to_save" in name:
                continue  # lookups are not matmuls; PEFT's trained copies are counted through `requires_grad` below
            total[part] += _numel(p)
            if p.requires_grad:
                trainable[part] += _numel(p)
        for name, p in model.named_parameters():  # trained copies (modules_to_save) replace frozen originals
            part = _part_of(name)
            if part and "modules_to_save" in name and p.requires_grad and "embed_tokens" not in name:
                trainable[part] += _numel(p)
        cfg = getattr(model, "config", None)
        vcfg = getattr(cfg, "vision_config", None) or {}
        if not isinstance(vcfg, dict):
            vcfg = vcfg.to_dict()
        text = getattr(cfg, "text_config", None) or cfg  # 4.x: the LLM's sizes sit in a nested text config
        return cls(total, trainable,
                   llm_layers=int(getattr(text, "num_hidden_layers", 0) or 0),
                   llm_hidden=int(getattr(text, "hidden_size", 0) or 0),
                   # the layers that run (drop_vision_last_layer), when the config knows them
                   vision_layers=int(getattr(cfg, "vision_layers", None) or vcfg.get("num_hidden_layers", 0)),
                   vision_hidden=int(vcfg.get("hidden_size", 0)))

    def step_flops(self, c: "StepCounts") -> float:
        """Model FLOPs (forward + backward, no recompute) of the work described by `c`."""
        n, nt = self.n_params, self.n_trainable
        f_llm = 2 * n["llm"] * c.real_tokens + 2 * self.llm_layers * self.llm_hidden * c.sum_len_sq
        f_vpm = 2 * n["vpm"] * c.patches + 4 * self.vision_layers * self.vision_hidden * c.sum_patches_sq
        f_res = 2 * n["resampler"] * c.patches
        grads_vpm = nt["vpm"] > 0
        grads_res = grads_vpm or nt["resampler"] > 0
        grads_llm = grads_res or nt["llm"] > 0
        flops = f_llm + f_vpm + f_res
        flops += (f_llm + 2 * nt["llm"] * c.real_tokens) if grads_llm else 0
        flops += (f_res + 2 * nt["resampler"] * c.patches) if grads_res else 0
        flops += (f_vpm + 2 * nt["vpm"] * c.patches) if grads_vpm else 0
        return float(flops)


# The per-step counts are all-reduced as one small float64 vector; keep this order in sync with `as_tensor`.
@dataclass
class StepCounts:
    label_tokens: float = 0.0  # tokens with a label (the loss denominator)
    real_tokens: float = 0.0  # attention_mask == 1
    padded_tokens: float = 0.0  # batch × padded length
    samples: float = 0.0
    images: float = 0.0
    crops: float = 0.0
    patches: float = 0.0
    sum_len_sq: float = 0.0
    sum_patches_sq: float = 0.0

    @classmethod
    def of_batch(cls, batch: dict) -> "StepCounts":
        mask = batch["attention_mask"]
        # a packed row (data.packing) holds several samples: count them and their lengths, not the row
        lens = torch.as_tensor(batch["seq_lens"]).double() if "seq_lens" in batch else mask.sum(dim=1).double()
        # 2.x: per-row `tgt_sizes`; 4.x: the processor's `target_sizes` of all crops of the batch (one tensor)
        sizes = batch["target_sizes"][None] if "target_sizes" in batch else batch.get("tgt_sizes", [])
        patches = [float(h * w) for ts in sizes for h, w in _pairs(ts)]
        # images, not crops: a sliced image is 1 image and several crops (collate carries the per-row image count;
        # a 4.x batch is the processor's output, which has no image count: 0 there)
        n_images = float(torch.as_tensor(batch["num_images"]).sum()) if "num_images" in batch else 0.0
        return cls(label_tokens=float((batch["labels"] != -100).sum()), real_tokens=float(lens.sum()),
                   padded_tokens=float(mask.numel()), samples=float(len(lens)), images=n_images,
                   crops=float(len(patches)), patches=sum(patches), sum_len_sq=float((lens ** 2).sum()),
                   sum_patches_sq=sum(p * p for p in patches))

    def __add__(self, other: "StepCounts") -> "StepCounts":
        return StepCounts(*(a + b for a, b in zip(self.as_list(), other.as_list())))

    def as_list(self) -> list[float]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(self.as_list(), dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "StepCounts":
        return cls(*(float(x) for x in t.tolist()))


def _pairs(ts) -> list[tuple[int, int]]:
    if ts is None:
        return []
    t = torch.as_tensor(ts).reshape(-1, 2)
    return [(int(h), int(w)) for h, w in t.tolist()]


class ThroughputMeter:
    """Accumulates global step counts over a logging window; `snapshot` returns the window's rates and resets it.

    Time is the wall clock between consecutive `add_step` calls (the first from `start`), so the time between
    steps counts: a step that takes 0.7 s inside `train_step` but comes 2 s after the previous one is a 2 s step.
    `step_s` (time inside the step) and `data_wait_s` (blocked on the data iterator) split that time up.
    """

    def __init__(self, flop_model: FlopModel, peak: float, world_size: int, clock=time.perf_counter):
        self.flop_model, self.peak, self.world_size, self.clock = flop_model, peak, world_size, clock
        self.total = StepCounts()
        self.total_train_s = 0.0  # wall-clock seconds from `start` to the last step's end
        self._mark = clock()  # `start` moves it (e.g. to the loop start, or past a warm-up left out)
        self._reset()

    def _reset(self) -> None:
        self.window, self.wall_s, self.step_s, self.wait_s, self.steps = StepCounts(), 0.0, 0.0, 0.0, 0

    def start(self) -> None:
        """(Re)start the clock: the next step's wall time is measured from here (also after a skipped stretch)."""
        self._mark = self.clock()

    def add_step(self, counts: StepCounts, step_s: float, data_wait_s: float) -> None:
        now = self.clock()
        wall, self._mark = now - self._mark, now
        self.window = self.window + counts
        self.total = self.total + counts
        self.wall_s += wall
        self.step_s += step_s
        self.wait_s += data_wait_s
        self.total_train_s += wall
        self.steps += 1

    def snapshot(self) -> dict:
        w, dt = self.window, max(self.wall_s, 1e-9)
        flops = self.flop_model.step_flops(w)
        out = {
            "step_time_s": self.wall_s / max(self.steps, 1),
            "tokens_per_s": w.real_tokens / dt,
            "padded_tokens_per_s": w.padded_tokens / dt,
            "samples_per_s": w.samples / dt,
            "images_per_s": w.images / dt,
            "tflops_per_gpu": flops / dt / self.world_size / 1e12,
            "mfu": (flops / dt / (self.world_size * self.peak)) if self.peak > 0 else 0.0,
            "data_wait_frac": self.wait_s / dt,
            "overhead_frac": max(0.0, 1.0 - self.step_s / dt) if self.steps else 0.0,
            "padding_frac": 1.0 - w.real_tokens / max(w.padded_tokens, 1.0),
            **peak_memory(),
        }
        self._reset()
        return out

    def run_means(self) -> dict:
        """Means over everything since `start` (this attempt): tokens/s and MFU over the wall clock."""
        dt = max(self.total_train_s, 1e-9)
        mfu = (self.flop_model.step_flops(self.total) / dt / (self.world_size * self.peak)) if self.peak > 0 else 0.0
        return {"train_time_s": self.total_train_s, "mean_tokens_per_s": self.total.real_tokens / dt,
                "mean_mfu": mfu}


def peak_memory() -> dict:
    """Peak memory of this process: GPU allocator peak on CUDA, else the peak resident set size."""
    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux: KiB
    if torch.cuda.is_available():
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


class Timer:
    """Wall-clock seconds of a block; on CUDA, synchronizes first so queued kernels are counted in the right step."""

    def __enter__(self):
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self.start

    @staticmethod
    def _sync():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------------------
# Trackers (rank 0 only): TensorBoard by default; MLflow / W&B when listed in train.report_to and installed.


class Trackers:
    def __init__(self, report_to: list[str], log_dir: str, run_name: str, config: dict,
                 jsonl_path: Optional[str] = None):
        self._writers = [_jsonl_writer(jsonl_path)] if jsonl_path else []
        for backend in report_to:
            try:
                self._writers.append(_open_tracker(backend, log_dir, run_name, config))
            except ImportError as e:  # the driver validates this; a worker without the package just warns
                log.warning("train.report_to=%s skipped: %s", backend, e)

    def log(self, metrics: dict, step: int) -> None:
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        scalars = {k: v for k, v in scalars.items() if v == v}  # NaN (no grad norm yet) is not a point
        for w in self._writers:
            w(scalars, step)

    def close(self) -> None:
        for w in self._writers:
            getattr(w, "close", lambda: None)()


def _jsonl_writer(path: str):
    import json
    import os

    os.makedirs(os.path.dirname(path), exist_ok=True)

    def write(scalars, step):
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")

    return write


def _open_tracker(backend: str, log_dir: str, run_name: str, config: dict):
    if backend == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=log_dir)

        def write(scalars, step):
            for k, v in scalars.items():
                writer.add_scalar(k, v, step)
            writer.flush()

        write.close = writer.close
        return write
    if backend == "mlflow":
        import mlflow

        mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:250] for k, v in _flatten(config).items()})

        def write(scalars, step):
            mlflow.log_metrics(scalars, step=step)

        write.close = mlflow.end_run
        return write
    if backend == "wandb":
        import wandb

        run = wandb.init(name=run_name, config=config, dir=log_dir)

        def write(scalars, step):
            run.log(scalars, step=step)

        write.close = run.finish
        return write
    raise ValueError(f"unknown tracker {backend!r}")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def format_log_line(m: dict, max_steps: Optional[int] = None, elapsed_s: Optional[float] = None,
                    eta_s: Optional[float] = None) -> str:
    """One progress line per logged step: `step N/max`, losses, rates, then elapsed time and ETA."""
    parts = [f"step {int(m['step'])}" + (f"/{max_steps}" if max_steps else ""), f"loss {m['loss']:.4f}"]
    if "eval_loss" in m:
        parts.append(f"eval_loss {m['eval_loss']:.4f}")
    parts += [f"lr {m['lr']:.2e}", f"grad_norm {m['grad_norm']:.3f}", f"{m['tokens_per_s']:.0f} tok/s",
              f"{m['step_time_s']:.2f} s/step", f"mfu {100 * m['mfu']:.1f}%", f"wait {100 * m['data_wait_frac']:.0f}%"]
    if elapsed_s is not None:
        parts.append(f"{format_duration(elapsed_s)} elapsed" + (f", eta {format_duration(eta_s)}"
                                                              if eta_s is not None else ""))
    return " | ".join(parts)


def format_duration(seconds: float) -> str:
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def format_run_report(summary: dict) -> str:
    """The end-of-run report, one fact per line."""
    lines = ["", "=== training run report ==="]
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        lines.append(f"{key:>24}: {value}")
    return "\n".join(lines)
