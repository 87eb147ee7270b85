"""A training forward and backward never read a device tensor back on the host.

Each such read (`.item()`, `bool(t)`, `.tolist()`, `.cpu()`) drains the GPU's queue: the recipe's profile on the
H200 counted 17 `.item()` reads and ~16 device-to-host copies per step in the forward, from the per-sample
`image_bound` checks, the crop sizes' round trip and transformers' packed-sequence check of `position_ids`. The fix:
the model names the batch keys it reads on the host (`MiniCPMVBase.host_batch_keys`), the train loop leaves them
there (`worker.to_device(..., keep)`), and unpacked 0..L-1 position ids are not passed at all.

How it is tested on a CPU: every tensor the train loop moves "to the device" is marked (a tensor subclass whose
results stay marked, like a CUDA tensor's); any host read of a marked tensor raises, naming the read.

The other way a forward drains the GPU's queue is a blocking host-to-device copy (`.to(cuda)` of a host tensor,
`torch.tensor(..., device=cuda)`: torch syncs the stream before it copies). The forward builds small index tensors
on the host; they go through `models.transfer.host_to_device` (pinned, `non_blocking`). On a CPU, a function mode
records every move of an unmarked (host) tensor to a device that is not queued. tests/gpu/test_host_syncs_gpu.py
checks both kinds on a GPU under torch's sync debug mode.

Run: pytest tests/unit/train/test_host_reads.py   (~10 s)
"""
from __future__ import annotations

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from raytune_minicpmv.config.schema import LoraConfig, TrainableConfig
from raytune_minicpmv.models import apply_trainable_policy, build_tiny, load_model
from raytune_minicpmv.models.kernels import configure_kernels
from raytune_minicpmv.models.loss import IGNORE_INDEX, batch_loss, with_label_positions
from raytune_minicpmv.train.worker import host_batch_keys, to_device

_READS = {"item", "tolist", "__bool__", "cpu", "numpy", "__int__", "__float__", "__index__"}


class OnDevice(torch.Tensor):
    """Stands for a tensor on the GPU: what is computed from it is one too; reading it on the host raises."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in _READS:
            raise AssertionError(f"host read of a device tensor: {name}")
        return super().__torch_function__(func, types, args, kwargs)


class BlockingCopies(TorchFunctionMode):
    """Records host tensors moved to a device without `non_blocking=True`, and tensors made from host data with a
    `device` (both a stream sync before the copy on CUDA)."""

    def __init__(self, scope: str = "/raytune_minicpmv/"):
        super().__init__()
        self.scope, self.seen = scope, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # only this package's calls: a library's `.to(device)` of its own buffer (RoPE's inv_freq, a mask) is on
        # the GPU already there, the CPU can't tell; the GPU test covers every caller
        if self.scope not in sys._getframe(1).f_code.co_filename:
            return func(*args, **kwargs)
        if func is torch.Tensor.to and type(args[0]) is torch.Tensor and not kwargs.get("non_blocking", False):
            if kwargs.get("device") is not None or any(isinstance(a, (torch.device, str)) for a in args[1:]):
                self.seen.append(f"Tensor.to{tuple(a for a in args[1:] if not torch.is_tensor(a))}")
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
            self.seen.append(f"{func.__name__}(..., device={kwargs['device']})")
        return func(*args, **kwargs)


def on_device(obj):
    if torch.is_tensor(obj):
        return obj.as_subclass(OnDevice)
    if isinstance(obj, dict):
        return {k: on_device(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_device(v) for v in obj)
    return obj


def moved(batch: dict, keep: tuple) -> dict:
    """What the train loop's to_device hands the model: the kept keys as they were, the rest on the device."""
    out = to_device(batch, torch.device("cpu"), keep)
    return {k: v if k in keep else on_device(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny("minicpmv2_6", tmp_path_factory.mktemp("tiny"), query_num=16)


def batch(with_images: bool = True, query_num: int = 16) -> dict:
    """Two rows of 2 * query_num + 28 tokens: three crops (two in row 0, one in row 1), 25 labelled tokens."""
    length, q = 2 * query_num + 28, query_num
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, length), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -15:], labels[1, -20:-10] = ids[0, -15:], ids[1, -20:-10]
    crops = [[torch.randn(3, 14, 14 * 12, generator=g), torch.randn(3, 14, 14 * 6, generator=g)],
             [torch.randn(3, 14, 14 * 12, generator=g)]] if with_images else [[], []]
    sizes = [torch.tensor([[3, 4], [2, 3]], dtype=torch.int32), torch.tensor([[4, 3]], dtype=torch.int32)]
    bounds = [torch.tensor([[2, 2 + q], [4 + q, 4 + 2 * q]]), torch.tensor([[2, 2 + q]])]
    if not with_images:
        sizes, bounds = [torch.zeros(0, 2, dtype=torch.int32)] * 2, [torch.zeros(0, 2, dtype=torch.long)] * 2
    return dict(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids),
                position_ids=torch.arange(length).repeat(2, 1), pixel_values=crops, tgt_sizes=sizes,
                image_bound=bounds)


def model_for(ckpt, varlen: bool, fused: bool):
    model = load_model(ckpt, dtype=torch.float32).train()
    configure_kernels(model, type("M", (), {"fused_ce": fused, "vision_varlen": varlen})(), use_gpu=False)
    return apply_trainable_policy(model, TrainableConfig(vision="full", llm="lora", resampler="full"),
                                  LoraConfig(r=4))


@pytest.mark.parametrize("varlen", [True, False], ids=["packed_crops", "padded_crops"])
@pytest.mark.parametrize("with_images", [True, False], ids=["images", "text_only"])
def test_a_training_step_reads_nothing_back_from_the_device(ckpt, varlen, with_images):
    model = model_for(ckpt, varlen, fused=True)
    keep = host_batch_keys(model)
    assert set(keep) == {"image_bound", "tgt_sizes", "position_ids"}  # through the PEFT wrapper
    total, count = batch_loss(model, moved(with_label_positions(batch(with_images)), keep), fused=True)
    total.backward()
    assert isinstance(total, OnDevice) and int(count) == 25


@pytest.mark.parametrize("varlen", [True, False], ids=["packed_crops", "padded_crops"])
@pytest.mark.parametrize("with_images", [True, False], ids=["images", "text_only"])
def test_a_training_step_queues_every_host_to_device_copy(ckpt, varlen, with_images):
    model = model_for(ckpt, varlen, fused=True)
    b = moved(with_label_positions(batch(with_images)), host_batch_keys(model))
    with BlockingCopies() as copies:
        total, _ = batch_loss(model, b, fused=True)
        total.backward()
    assert copies.seen == []


def test_the_published_layout_queues_every_host_to_device_copy(published26):
    """The same on a checkpoint laid out like the published 2.6 folder (its real config.json: query_num 64)."""
    model = model_for(published26, True, fused=True)
    b = moved(with_label_positions(batch(query_num=model.get_base_model().config.query_num)), host_batch_keys(model))
    with BlockingCopies() as copies:
        total, count = batch_loss(model, b, fused=True)
        total.backward()
    assert copies.seen == [] and isinstance(total, OnDevice) and int(count) == 25


def test_the_copy_recorder_sees_a_blocking_copy():
    """Control: the recorder sees the two forms a forward used (the vision position ids' `.to(device)`, the fused
    loss's token count made with `torch.tensor(..., device=...)`), and lets a queued copy pass."""
    with BlockingCopies(scope=__file__) as copies:
        torch.arange(4).to(torch.device("cpu"))
        torch.tensor(3, device="cpu")
        torch.arange(4).to("cpu", non_blocking=True)
        torch.arange(4).to(torch.float32)
    assert copies.seen == ["Tensor.to(device(type='cpu'),)", "tensor(..., device=cpu)"]


def test_the_marking_catches_a_host_read(ckpt):
    """Control: the same step with every key moved (the loop as it was) reads spans back on the host."""
    model = model_for(ckpt, True, True)
    with pytest.raises(AssertionError, match="host read of a device tensor"):
        batch_loss(model, moved(with_label_positions(batch()), ()), fused=True)


def test_plain_positions_left_to_the_llm_give_the_same_loss_and_gradients(ckpt, monkeypatch):
    """Unpacked rows' 0..L-1 positions are left to the LLM (not passed): the same loss and gradients as passing
    them, and packed rows (positions restarting per sample) are still passed."""
    from raytune_minicpmv.models import modeling

    results = []
    for passed in (False, True):
        if passed:  # the reference: the ids given to the LLM as they are
            monkeypatch.setattr(modeling, "llm_position_ids", lambda ids, device: ids.to(device).long())
        torch.manual_seed(0)
        model = model_for(ckpt, True, fused=True).eval()  # eval: no LoRA dropout, the same math twice
        total, _ = batch_loss(model, with_label_positions(batch()), fused=True)
        total.backward()
        results.append((total.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                         if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    assert results[0][1].keys() == results[1][1].keys() and len(results[0][1]) > 20
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=0, atol=0, msg=name)
    monkeypatch.undo()
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    assert modeling.llm_position_ids(torch.arange(7).repeat(2, 1), torch.device("cpu")) is None
    assert torch.equal(modeling.llm_position_ids(packed, torch.device("cpu")), packed)
