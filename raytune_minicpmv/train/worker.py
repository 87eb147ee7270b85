"""The Ray Train worker loop: build the DeepSpeed engine, (resume,) step, evaluate, log, checkpoint.

    TorchTrainer(train_fn_per_worker, train_loop_config={"config": cfg.to_dict(), "run_name": name}, ...)

`trainer.build_trainer` wires this into a TorchTrainer; the step arithmetic (global-batch token mean) is described in
`trainer.py`'s docstring and docs/TRAINING.md. Also: where a run's per-step metrics live (`tensorboard_dir`,
`metrics_jsonl`), read back by the driver.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Callable, Iterator, Optional

import torch

from .checkpoint import TrainState, load_checkpoint
from .grad_norm import keep_plain_grad_norm
from ..config import Config, config_from_dict, is_uri, join_uri
from .engine import build_ds_config, build_lr_scheduler, build_optimizer, fix_cuda_arch_list, restore_torch_linear
from .metrics import FlopModel, StepCounts, ThroughputMeter, Timer, Trackers, peak_flops
from .profiling import phase
from .progress import Progress, StepReporter, report_to_ray, step_actions

log = logging.getLogger(__name__)
_HF_DS_CONFIG = None  # see build_engine


def tensorboard_dir(cfg: Config, run_name: Optional[str] = None) -> str:
    run_dir = join_uri(cfg.run.storage_path, run_name or cfg.run.name)
    if is_uri(run_dir):  # TensorBoard writes locally; remote storage gets the Ray checkpoints only
        return os.path.join(tempfile.gettempdir(), "raytune_minicpmv_tb", run_name or cfg.run.name)
    return os.path.join(run_dir, "tensorboard")


def metrics_jsonl(cfg: Config, run_name: Optional[str] = None) -> Optional[str]:
    """Every report as one JSON line (rank 0), next to the checkpoints when the storage is a local/NFS path."""
    run_dir = join_uri(cfg.run.storage_path, run_name or cfg.run.name)
    return None if is_uri(run_dir) else os.path.join(run_dir, "metrics.jsonl")


def train_fn_per_worker(config_dict: dict) -> None:
    """Ray Train worker loop: build, (resume,) train `max_steps` optimizer steps, evaluate, log, checkpoint."""
    import ray.train

    _quiet_worker_logs()
    cfg = worker_config(config_dict)
    run_name = config_dict.get("run_name", cfg.run.name)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    say = Progress(rank)
    will_fail = _fail_hook_armed(cfg, run_name)

    engine, model = build_engine(cfg, say)
    state = TrainState()
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        say(f"loading checkpoint {resumed.path} ...")
        with resumed.as_directory() as d:
            state = load_checkpoint(engine, d)
        say(f"resumed from {resumed.path} at step {state.step}")
    resumed_step = state.step
    if rank == 0:  # a resumed run logs no step twice
        from .resume_check import rewind_history

        rewind_history(metrics_jsonl(cfg, run_name), tensorboard_dir(cfg, run_name), state.step)

    from ..data.pipeline import collate

    batches = micro_batches(ray.train.get_dataset_shard("train"), cfg, collate, state)
    has_eval = dataset_shard("eval") is not None  # no eval split: no evaluation, checkpoints all the same
    meter = ThroughputMeter(FlopModel.from_model(model), peak_flops() if cfg.scaling.use_gpu else 0.0, world)
    trackers = Trackers(cfg.train.report_to, tensorboard_dir(cfg, run_name), run_name, cfg.to_dict(),
                        jsonl_path=metrics_jsonl(cfg, run_name)) if rank == 0 else None
    reporter = StepReporter(meter, trackers, rank, world, cfg.train.max_steps, say)
    from ..infer.evaluation import maybe_scorer

    scorer = maybe_scorer(cfg, world) if has_eval else None  # eval.generation_metrics
    engine.train()
    if state.step < cfg.train.max_steps:
        per = (f"{cfg.train.micro_batch_size} sample(s)" if cfg.train.max_tokens_per_batch is None else
               f"<= {cfg.train.max_tokens_per_batch} tokens{' (packed rows)' if cfg.data.packing else ''}")
        say(f"first step (world {world}, {cfg.train.gradient_accumulation_steps} micro-batch(es) of {per} per "
            "rank; the data stream starts) ...")
    reporter.start(state.step)
    while state.step < cfg.train.max_steps:
        loss_sum, counts, step_s, wait_s, lr = train_step(engine, batches, cfg, world)
        state.step += 1
        state.tokens_seen += counts.label_tokens
        reporter.add_step(loss_sum, counts, step_s, wait_s, lr)
        if state.step == resumed_step + 1:
            say(f"first step done in {step_s:.1f} s")
        if will_fail and state.step == cfg.train.fail_at_step:
            _trigger_failure(cfg, run_name, rank)
        do = step_actions(cfg.train, state.step, has_eval)
        if not do.log:
            continue
        metrics = reporter.window_metrics(engine, state)
        metrics["resumed_from_step"] = resumed_step
        if do.evaluate:
            eval_loss = evaluate(engine, cfg)
            if eval_loss is not None:
                metrics["eval_loss"] = eval_loss
                if state.best_eval_loss is None or eval_loss < state.best_eval_loss:
                    state.best_eval_loss = eval_loss
            if scorer is not None:
                metrics.update(evaluate_generation(engine, scorer, say))
        if state.best_eval_loss is not None:
            metrics["best_eval_loss"] = state.best_eval_loss
        reporter.log(metrics)
        if do.report:
            if do.save:
                say(f"saving checkpoint of step {state.step} ...")
            report_to_ray(engine, model, metrics, state, config_dict["config"], rank, save=do.save)
    if trackers:
        trackers.close()


def dataset_shard(name: str):
    """This worker's shard of dataset `name`, or None when the trainer has no such dataset (Ray Train V2 raises
    KeyError for a missing name, V1 returned None)."""
    import ray.train

    try:
        return ray.train.get_dataset_shard(name)
    except KeyError:
        return None


def _quiet_worker_logs() -> None:
    """Our per-report progress line says what matters; drop the per-report repeats of Ray Train (the whole report
    dict, twice per report) and DeepSpeed's per-step FutureWarnings about torch's renamed collectives."""
    import warnings

    from ray.train.v2._internal.execution import context, storage

    for name in (context.__file__, storage.__name__):  # Ray names the first logger by its file path
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def worker_config(config_dict: dict) -> Config:
    """The Config inside the worker: the driver's dict plus any dotted top-level overrides (Tune trials)."""
    import copy

    raw = copy.deepcopy(config_dict["config"])
    for key, value in config_dict.items():
        if "." in key:
            node = raw
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    return config_from_dict(raw, check_paths=False)


def build_engine(cfg: Config, say: Callable[[str], None] = lambda msg: None):
    """Model (ZeRO-3: materialized partitioned under zero.Init), trainable policy, optimizer, schedule, engine.

    `deepspeed.zero_stage` / `model.gradient_checkpointing` = auto are resolved first (engine_plan: the cheapest
    choice whose memory estimate fits the card); the estimate and the choice go to `say`, which gets a line before
    each long phase too (rank 0's Progress in the worker; silent by default).
    """
    fix_cuda_arch_list()
    import deepspeed
    import torch.distributed as dist

    from .ds_fixes import apply_ds_fixes
    from .engine_plan import local_capacity_bytes, plan_engine
    from ..models import apply_trainable_policy, enable_gradient_checkpointing, format_parameter_table, load_model_for
    from ..models.registry import as_torch_dtype
    from ..models.kernels import compile_vision_layers, configure_kernels
    from .profiling import attach_profiler

    torch.manual_seed(cfg.run.seed)  # same LoRA init on every rank
    deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")  # wraps Ray's group
    world, rank = dist.get_world_size(), dist.get_rank()
    # the smallest card of the group decides, so every rank makes the same choice
    capacity = all_reduce(torch.tensor([local_capacity_bytes(cfg.scaling.use_gpu, _local_workers(cfg))],
                                       dtype=torch.float64), _comm_device(cfg), op=dist.ReduceOp.MIN)
    plan = plan_engine(cfg, world, int(capacity.item()))
    say(plan.describe())
    cfg = plan.apply(cfg)
    ds_cfg = build_ds_config(cfg)
    if cfg.deepspeed.zero_stage == 3 and not ds_cfg["zero_optimization"]["memory_efficient_linear"]:
        restore_torch_linear()  # an earlier engine of this process may have patched it
    dtype = as_torch_dtype(cfg.model.dtype)
    global _HF_DS_CONFIG
    _HF_DS_CONFIG = None
    if cfg.deepspeed.zero_stage == 3:
        # While this object is alive, transformers' from_pretrained (inside load_model) builds the model under
        # deepspeed.zero.Init — every parameter is partitioned as it is created, so no rank ever holds the whole
        # model — and loads the checkpoint shard by shard into the partitions.
        from transformers.integrations import HfDeepSpeedConfig

        _HF_DS_CONFIG = HfDeepSpeedConfig(ds_cfg)  # transformers keeps only a weak reference
    zero3 = " under ZeRO-3 (partitioned while loading)" if cfg.deepspeed.zero_stage == 3 else ""
    quant = f", {cfg.model.quantization} LLM linears" if cfg.model.quantization != "none" else ""
    say(f"loading model {cfg.model.path} ({cfg.model.dtype}{quant}){zero3} ...")
    t0 = time.perf_counter()
    # model.path, attn_implementation, trust_remote_code; quantization: bitsandbytes layers built on this rank's device
    model = load_model_for(cfg.model, dtype, device=_comm_device(cfg))
    if cfg.data.packing:  # the LLM's attention over packed rows (model.packed_attention)
        from ..models.packing import resolve_packed_attention, use_packed_attention

        backend = resolve_packed_attention(cfg.model.packed_attention, cfg.scaling.use_gpu, dtype)
        say(f"packed rows: LLM attention {backend} (model.packed_attention={cfg.model.packed_attention})")
        use_packed_attention(model, backend)
    kernels = configure_kernels(model, cfg.model, cfg.scaling.use_gpu)  # before PEFT (which copies vpm)
    say(kernels.describe())
    # re-seeded: the LoRA draws then depend on run.seed only, not on how loading used the random stream (building
    # under zero.Init draws differently), so every stage starts from the same adapter and every rank agrees
    torch.manual_seed(cfg.run.seed)
    model = apply_trainable_policy(model, cfg.trainable, cfg.lora)
    if kernels.compile_vision:
        compile_vision_layers(model)
    say(f"model loaded in {time.perf_counter() - t0:.1f} s; parameters per part:\n{format_parameter_table(model)}")
    _cast_new_trainables(model, dtype)
    enable_gradient_checkpointing(model, mode=cfg.model.gradient_checkpointing)  # non-reentrant
    if cfg.deepspeed.zero_stage == 3:  # 4.x: the per-crop connector gathered once per forward (models/zero3.py)
        from ..models.registry import FAMILIES
        from ..models.zero3 import prepare_for_zero3

        layers = cfg.deepspeed.zero3_leaf_layers and not FAMILIES[cfg.model.family].hf_native
        leaves = prepare_for_zero3(model, layer_leaves=layers)
        if layers:
            say(f"ZeRO-3: {len(leaves)} layers gathered whole (deepspeed.zero3_leaf_layers)")  # decoder layers
    optimizer = build_optimizer(model, cfg)
    fixes = apply_ds_fixes()  # DeepSpeed's per-tensor host syncs (train/ds_fixes.py)
    say(f"DeepSpeed fixes: {', '.join(fixes) or 'off'}")
    say(f"DeepSpeed initialize (ZeRO-{cfg.deepspeed.zero_stage}, {cfg.model.dtype}) ...")
    t0 = time.perf_counter()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=build_lr_scheduler(
        optimizer, cfg.optim, cfg.train.max_steps), config=ds_cfg)
    say(f"DeepSpeed ready in {time.perf_counter() - t0:.1f} s")
    attach_profiler(engine, cfg, rank)  # train.profile_steps > 0 only
    return engine, model


def _comm_device(cfg: Config):
    return torch.device("cuda", torch.cuda.current_device()) if cfg.scaling.use_gpu and torch.cuda.is_available() \
        else torch.device("cpu")


def _local_workers(cfg: Config) -> int:
    """CPU runs share the host's memory between the workers on it (LOCAL_WORLD_SIZE from Ray Train / torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", cfg.scaling.num_workers))


def _cast_new_trainables(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """PEFT creates LoRA weights in fp32 next to a bf16 base; DeepSpeed's bf16/fp16 engine needs one dtype (it
    keeps the fp32 master copies itself). ZeRO-3-partitioned (loaded) tensors already have the load dtype."""
    for p in model.parameters():
        if p.requires_grad and not hasattr(p, "ds_id") and p.dtype != dtype:
            p.data = p.data.to(dtype)


def all_reduce(t: torch.Tensor, device, op=None) -> torch.Tensor:
    """all_reduce a small CPU tensor through the process group's device (NCCL only reduces CUDA tensors)."""
    import torch.distributed as dist

    d = t.to(device)
    dist.all_reduce(d, op=op or dist.ReduceOp.SUM)
    return d.cpu()


def micro_batches(shard, cfg: Config, collate, state: TrainState) -> Iterator[dict]:
    """Endless micro-batches of this rank's shard, epoch after epoch, resuming at `state`'s data position.

    Keeps `state.epoch` / `state.batch_in_epoch` current, so a checkpoint records where the data stands.
    """
    skip = state.batch_in_epoch
    while True:
        n = 0
        for batch in epoch_batches(shard, cfg, collate, drop_last=True):
            n += 1
            if n <= skip:
                continue  # resume: these were consumed before the checkpoint
            state.batch_in_epoch = n
            yield batch
        if n == 0:
            raise RuntimeError("the train split yields no micro-batch on this rank: it needs at least "
                               "num_workers × micro_batch_size rows")
        skip = 0
        state.epoch += 1
        state.batch_in_epoch = 0


def epoch_batches(shard, cfg: Config, collate, drop_last: bool) -> Iterator[dict]:
    """One epoch of micro-batches: `micro_batch_size` rows each, or within `train.max_tokens_per_batch` tokens
    (padded, or packed rows with data.packing; data/packing.py), collated in a background thread."""
    budget = cfg.train.max_tokens_per_batch
    pin = cfg.train.pin_memory and torch.cuda.is_available()  # in the collate thread: asynchronous copies to the GPU
    if budget is None:
        fn = (lambda batch: pinned(collate(batch))) if pin else collate
        return iter(shard.iter_torch_batches(batch_size=cfg.train.micro_batch_size, collate_fn=fn,
                                             drop_last=drop_last))
    from ..data.packing import PACK_WINDOW_ROWS, budget_micro_batches, prefetched

    rows = shard.iter_batches(batch_size=PACK_WINDOW_ROWS, batch_format="numpy")
    batches = budget_micro_batches(rows, budget, cfg.data.packing)
    return prefetched(map(pinned, batches) if pin else batches)


def train_step(engine, batches: Iterator[dict], cfg: Config, world: int):
    """One optimizer step; returns (local loss sum as a 0-dim float64 tensor on the engine's device, global
    StepCounts, step s, data-wait s, lr applied)."""

    from ..models.kernels import uses_fused_loss
    from ..models.loss import batch_loss, with_label_positions

    fused = uses_fused_loss(engine.module)  # model.fused_ce: the loss from hidden states, no logits
    host = host_batch_keys(engine.module)
    with Timer() as step_t:
        with Timer() as wait_t, phase("data"):
            micro = [next(batches) for _ in range(cfg.train.gradient_accumulation_steps)]
        with phase("counts"):
            local = StepCounts()
            for b in micro:
                local = local + StepCounts.of_batch(b)
            # the global token count of this step (the loss denominator) and the throughput counts, in one collective
            counts = StepCounts.from_tensor(all_reduce(local.as_tensor(), engine.device))
        scale = world / max(counts.label_tokens, 1.0)
        loss_total = torch.zeros((), dtype=torch.float64, device=engine.device)  # read at log steps only
        lr = float(engine.get_lr()[0])  # the lr this step applies (the scheduler moves on inside engine.step)
        for b in micro:
            with phase("to_device"):
                b = to_device(with_label_positions(b) if fused else b, engine.device, host)
            with phase("forward"):
                loss_sum, _ = batch_loss(engine, b, fused, cfg.model.family, cfg.model.downsample_mode)
            with phase("backward"):
                engine.backward(loss_sum * scale, scale_wrt_gas=False)
            with phase("optimizer"):
                keep_plain_grad_norm(engine)
                engine.step()
            loss_total += loss_sum.detach().double()  # stays on the device: no host sync per micro-batch
    return loss_total, counts, step_t.seconds, wait_t.seconds, lr


@torch.no_grad()
def evaluate(engine, cfg: Config) -> Optional[float]:
    """Token-weighted eval loss over the eval split (all_reduce of loss sum and token count; no logit gathering).

    Every rank runs the same number of forwards (a ZeRO-3 forward is a collective): before each batch the ranks
    agree (all_reduce MIN) that all of them still have one.
    """
    import torch.distributed as dist

    from ..data.pipeline import collate
    from ..models.kernels import uses_fused_loss
    from ..models.loss import batch_loss

    shard = dataset_shard("eval")
    if shard is None:
        return None
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    it = epoch_batches(shard, cfg, collate, drop_last=False)
    fused, host = uses_fused_loss(engine.module), host_batch_keys(engine.module)
    n = 0
    while cfg.train.eval_max_batches is None or n < cfg.train.eval_max_batches:
        batch = next(it, None)
        have = all_reduce(torch.tensor([0 if batch is None else 1], dtype=torch.int64), engine.device,
                          op=dist.ReduceOp.MIN)
        if not have.item():
            break
        b = to_device(batch, engine.device, host)
        loss_sum, n_tok = batch_loss(engine, b, fused, cfg.model.family, cfg.model.downsample_mode)
        totals += torch.tensor([float(loss_sum), float(n_tok)], dtype=torch.float64)
        n += 1
    engine.train()
    totals = all_reduce(totals, engine.device)
    return float(totals[0] / totals[1]) if totals[1] > 0 else None


def evaluate_generation(engine, scorer, say) -> dict[str, float]:
    """eval.generation_metrics on the first eval rows (infer.evaluation), in eval mode like `evaluate`."""
    engine.eval()
    try:
        return scorer.score(engine, dataset_shard("eval"), engine.device,
                            lambda t, op=None: all_reduce(t, engine.device, op=op), say)
    finally:
        engine.train()


def pinned(obj):
    """The collate dict with its CPU tensors in page-locked memory (CUDA only). `to_device`'s `non_blocking` copy of
    a pageable tensor is synchronous (the host stages it); of a pinned one it is queued, so the host goes on to
    launch the forward while the batch crosses (the recipe's profile: 88 pageable copies, 28 ms of host time a
    step). Runs in the collate thread, off the training loop."""
    if torch.is_tensor(obj):
        return obj.pin_memory() if obj.device.type == "cpu" else obj
    if isinstance(obj, dict):
        return {k: pinned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(pinned(v) for v in obj)
    return obj


def host_batch_keys(model) -> tuple:
    """The batch keys the model's forward reads on the host (MiniCPMVBase.host_batch_keys: image spans, crop sizes,
    position ids); () for models that expect the whole batch on their device (remote code, the 4.x families)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return tuple(getattr(base, "host_batch_keys", ()))


def to_device(obj, device, keep: tuple = ()):
    """Move the collate dict (tensors, lists of tensors) to the engine's device; the top-level keys in `keep` stay
    on the host (`host_batch_keys`)."""
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: v if k in keep else to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


# Test hook (train.fail_at_step): raise once, on the first attempt only. The marker lives in the run directory,
# decided at worker start so that every rank of one attempt agrees.
def _fail_marker(cfg: Config, run_name: str) -> Optional[str]:
    run_dir = join_uri(cfg.run.storage_path, run_name)
    return None if is_uri(run_dir) else os.path.join(run_dir, f".fail_at_step_{cfg.train.fail_at_step}")


def _fail_hook_armed(cfg: Config, run_name: str) -> bool:
    marker = _fail_marker(cfg, run_name) if cfg.train.fail_at_step else None
    return bool(marker) and not os.path.exists(marker)


def _trigger_failure(cfg: Config, run_name: str, rank: int) -> None:
    import torch.distributed as dist

    if rank == 0:
        marker = _fail_marker(cfg, run_name)
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        open(marker, "w").close()
    dist.barrier()  # the marker exists before any rank fails (a failing rank tears the whole group down)
    raise RuntimeError(f"train.fail_at_step={cfg.train.fail_at_step}: injected failure (test hook)")
