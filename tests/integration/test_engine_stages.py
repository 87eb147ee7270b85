"""ZeRO stages 0 and 1 (and auto) run the real engine: train.build_engine + train.train_step, one process (gloo,
world size 1, no Ray), tiny MiniCPM-V 2.6, LoRA + a fully trained resampler. Every stage must apply the same update
as ZeRO-2 from the same start: same loss, same trained weights after two steps.
    .venv/bin/python -m pytest tests/integration/test_engine_stages.py -q
"""
import itertools

import pytest
import torch

from raytune_minicpmv.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import os

    from raytune_minicpmv.models import build_tiny
    from raytune_minicpmv.data.pipeline import preprocess_for_check
    from raytune_minicpmv.data.sample_data import write_sample_dataset

    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(k, v)
    root = tmp_path_factory.mktemp("stages")
    ckpt = build_tiny("minicpmv2_6", root / "m")
    data = write_sample_dataset(root / "d")
    batches = [preprocess_for_check(ckpt, data, index=i) for i in (0, 3)]
    yield ckpt, batches
    _forget_zero3()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _forget_zero3():
    """A ZeRO-3 build_engine keeps transformers' HfDeepSpeedConfig alive (train/worker.py, right for a worker
    process): in this shared pytest process every later from_pretrained would build partitioned under zero.Init."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from raytune_minicpmv.train import worker

    worker._HF_DS_CONFIG = None
    unset_hf_deepspeed_config()


def run_steps(ckpt, batches, *overrides, steps=2):
    from raytune_minicpmv.train.worker import build_engine, train_step

    cfg = load_config(None, [f"model.path={ckpt}", "scaling.use_gpu=false", "model.dtype=fp32",
                             "trainable.llm=lora", "trainable.resampler=full", "lora.dropout=0.0",
                             "optim.lr=1e-2", "optim.warmup_steps=0", "train.max_steps=2", *overrides],
                      check_paths=False)
    engine, model = build_engine(cfg, say=print)  # say: what the worker gives rank 0 (its progress printer)
    it = itertools.cycle(batches)
    losses = [float(train_step(engine, it, cfg, world=1)[0]) for _ in range(steps)]
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, trained, engine


def test_zero0_and_zero1_apply_the_zero2_update(setup, capsys):
    ckpt, batches = setup
    ref_losses, ref, _ = run_steps(ckpt, batches, "deepspeed.zero_stage=2")
    for stage in (0, 1):
        losses, trained, engine = run_steps(ckpt, batches, f"deepspeed.zero_stage={stage}")
        assert engine.zero_optimization_stage() == stage
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        assert trained.keys() == ref.keys()
        for n in ref:
            # the stages sum gradients in other orders; Adam divides by the gradient's own size, so an element whose
            # gradient is near zero moves by a different fraction of its step: up to 8e-6 here (1 element of 8,192,
            # AMD EPYC, torch 2.13), < 0.1 % of the lr-1e-2 step; a wrong update is off by whole steps
            torch.testing.assert_close(trained[n], ref[n], rtol=1e-4, atol=2e-5)
    assert losses[1] != losses[0]  # the weights moved between the two steps


def test_every_stage_reports_the_same_finite_grad_norm(setup):
    """DeepSpeed's plain path (ZeRO-0, fp32: the CPU / laptop default) clips and discards the norm, so the log line
    printed `grad_norm nan` there; every stage must report the norm of the same gradients."""
    from raytune_minicpmv.train.grad_norm import grad_norm

    ckpt, batches = setup
    norms = {}
    for stage in (0, 1, 2):
        _, _, engine = run_steps(ckpt, batches, f"deepspeed.zero_stage={stage}", steps=1)
        norms[stage] = grad_norm(engine)
    assert all(n is not None and 0 < n < float("inf") for n in norms.values()), norms
    assert norms[0] == pytest.approx(norms[2], rel=1e-4) and norms[1] == pytest.approx(norms[2], rel=1e-4)


def test_qlora_zero0_and_zero1_apply_the_zero2_update(setup):
    """model.quantization=nf4 (issue 14): the same equality on a 4-bit base (bitsandbytes' CPU backend)."""
    pytest.importorskip("bitsandbytes")
    ckpt, batches = setup
    ref_losses, ref, _ = run_steps(ckpt, batches, "deepspeed.zero_stage=2", "model.quantization=nf4")
    for stage in (0, 1):
        losses, trained, engine = run_steps(ckpt, batches, f"deepspeed.zero_stage={stage}", "model.quantization=nf4")
        assert engine.zero_optimization_stage() == stage
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        for n in ref:  # Adam at lr 1e-2 turns last-bit differences of near-zero gradients into ~4e-6
            torch.testing.assert_close(trained[n], ref[n], rtol=1e-4, atol=2e-5)
    assert losses[1] != losses[0]  # the weights moved between the two steps (two different batches)


def test_auto_picks_zero0_without_recompute_for_a_model_that_fits(setup, capsys):
    ckpt, batches = setup
    _, _, engine = run_steps(ckpt, batches)  # the defaults: zero_stage=auto, gradient_checkpointing=auto
    assert engine.zero_optimization_stage() == 0
    assert "engine choice: ZeRO-0, gradient_checkpointing=false" in capsys.readouterr().out


def test_profile_writes_a_trace_and_prints_the_summary(setup, capsys, tmp_path):
    from raytune_minicpmv.train.profiling import WARMUP_STEPS

    ckpt, batches = setup
    run_steps(ckpt, batches, "deepspeed.zero_stage=0", "train.profile_steps=1", f"run.storage_path={tmp_path}",
              "run.name=prof", "train.max_steps=8", steps=WARMUP_STEPS + 2)
    out = capsys.readouterr().out
    assert f"profile of 1 steps: trace {tmp_path}/prof/profile/trace_rank0.json" in out
    assert "top host operators (self CPU time per step):" in out  # CPU: no kernels, the operators instead
    assert "GPU idle" not in out
    phases = out.split("step phases (ms per step: host time in it):\n", 1)[1].split("top host", 1)[0]
    # every phase of worker.train_step, once per recorded step (the data wait too: the step's first phase)
    assert {line.split()[0] for line in phases.splitlines()} >= {"data", "counts", "to_device", "forward",
                                                                "backward", "optimizer"}
    assert (tmp_path / "prof" / "profile" / "trace_rank0.json").stat().st_size > 1000


def test_zero3_with_and_without_leaf_layers_applies_the_zero2_update(setup, capsys):
    """deepspeed.zero3_leaf_layers (each LLM decoder layer and vision encoder layer gathered whole) changes how ZeRO-3
    gathers, never what it computes: with activation checkpointing, LoRA or fully trained decoder layers and a fully
    trained vision tower (packed crops), both variants apply ZeRO-2's update. (When the packed vision path called a
    layer's submodules itself, a leaf vision layer's hooks never fired and its gradients stayed unreduced: this test
    failed then, with vision=full.)"""
    ckpt, batches = setup
    try:
        for trained in (("trainable.vision=full",), ("trainable.llm=full", "trainable.vision=full")):
            _leaves_vs_zero2(ckpt, batches, capsys, ("model.gradient_checkpointing=true", *trained))
    finally:
        _forget_zero3()


def test_zero3_with_every_layer_recomputed_runs_torchs_linear_and_applies_the_zero2_update(setup):
    """deepspeed.memory_efficient_linear=auto: DeepSpeed's linear (a Python autograd function patched over F.linear
    for the whole process, ~60 % of ZeRO-3's host overhead in a CPU profile) only while some layer keeps its
    activations; with checkpointing true torch's own F.linear runs, also after an earlier engine patched it."""
    import torch.nn.functional as F
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    ckpt, batches = setup
    on = ("trainable.vision=full",)
    try:
        run_steps(ckpt, batches, "deepspeed.zero_stage=3", "model.gradient_checkpointing=false", *on, steps=1)
        assert F.linear is zero3_linear_wrap  # kept activations: DeepSpeed's linear (the default DeepSpeed ships)
        ref_losses, ref, _ = run_steps(ckpt, batches, "deepspeed.zero_stage=2", "model.gradient_checkpointing=true",
                                       *on)
        losses, _, engine = run_steps(ckpt, batches, "deepspeed.zero_stage=3", "model.gradient_checkpointing=true",
                                      *on)
        assert F.linear is torch._C._nn.linear  # torch's own
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        assert_zero3_weights_close(engine, ref)
    finally:
        _forget_zero3()


def test_compiled_vision_layers_under_zero3_leaves_apply_the_zero2_update(setup):
    """model.compile_vision (on in the LoRA recipe) inside ZeRO-3 leaf vision layers with checkpointing: torch.compile
    (inductor, CPU here) of the MLP and layer norms changes no loss and no update beyond summation order (2.5e-4 on
    near-zero-gradient elements: as DeepSpeed's per-module path below), and the compiled modules are the ones run."""
    ckpt, batches = setup
    on = ("model.gradient_checkpointing=true", "trainable.vision=full")
    try:
        ref_losses, ref, _ = run_steps(ckpt, batches, "deepspeed.zero_stage=2", *on)
        losses, _, engine = run_steps(ckpt, batches, "deepspeed.zero_stage=3", *on, "model.compile_vision=true")
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        layers = engine.module.get_base_model().vpm.encoder.layers
        assert all(layer.mlp._compiled_call_impl is not None for layer in layers)
        assert_zero3_weights_close(engine, ref)
    finally:
        _forget_zero3()


def assert_zero3_weights_close(engine, ref: dict) -> None:
    """The ZeRO-3 engine's trained weights (gathered) against ZeRO-2's `ref`.

    Adam divides by the gradient's own size: near-zero gradients (LoRA A while B is ~0) turn ZeRO-3's other
    summation order into weight differences: none with leaf layers, up to 2.3e-4 with DeepSpeed's per-module
    gathering (transformers 5.24, torch 2.13; 6e-5 with earlier versions), 1 element in 8,192, a few % of the
    lr-1e-2 step; a missed or stale gather is off by whole steps (and the second loss would differ)."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([params[n] for n in ref]):
        for n in ref:
            torch.testing.assert_close(params[n].detach(), ref[n], rtol=1e-4, atol=5e-4)


def _leaves_vs_zero2(ckpt, batches, capsys, ckpt_on):
    ref_losses, ref, _ = run_steps(ckpt, batches, "deepspeed.zero_stage=2", *ckpt_on)
    for leaves in ("true", "false"):
        losses, trained, engine = run_steps(ckpt, batches, "deepspeed.zero_stage=3", *ckpt_on,
                                            f"deepspeed.zero3_leaf_layers={leaves}")
        out = capsys.readouterr().out
        base = engine.module.get_base_model() if hasattr(engine.module, "get_base_model") else engine.module
        n_layers = len(base.llm.model.layers) + len(base.vpm.encoder.layers)
        assert (f"ZeRO-3: {n_layers} layers gathered whole" in out) == (leaves == "true")
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        assert_zero3_weights_close(engine, ref)
