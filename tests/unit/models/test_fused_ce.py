"""Fused linear + CE (loss.linear_cross_entropy, model(batch, loss_only=True)) against the plain path
`compute_loss(lm_head(hidden))`: same sum, same count, same gradients in fp32; the global-token normalisation the
train loop applies gives the mean over every target of the step; the head never sees the whole sequence.

Run: pytest tests/unit/models/test_fused_ce.py   (~15 s)
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raytune_minicpmv.config.schema import LoraConfig, TrainableConfig
from raytune_minicpmv.models import apply_trainable_policy, build_tiny, compute_loss, load_model
from raytune_minicpmv.models import loss as loss_mod
from raytune_minicpmv.models.kernels import KernelPlan, configure_kernels, plan_kernels, uses_fused_loss
from raytune_minicpmv.models.loss import (IGNORE_INDEX, batch_loss, labelled_positions, linear_cross_entropy,
                                          with_label_positions)

D, V = 16, 37


def case(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 13, D, generator=g)
    labels = torch.randint(0, V, (2, 13), generator=g)
    labels[0, 3:11] = IGNORE_INDEX  # a stretch without targets, spanning chunk boundaries
    labels[1, 0] = IGNORE_INDEX
    torch.manual_seed(seed)
    head = torch.nn.Linear(D, V, bias=True)
    return hidden, labels, head


def plain(hidden, labels, head):
    return compute_loss(head(hidden), labels)


def grads_of(fn, hidden, labels, head):
    h = hidden.clone().requires_grad_(True)
    head.zero_grad()
    total, count = fn(h, labels, head)
    (total * 0.37).backward()
    return total.detach(), count, h.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()


@pytest.mark.parametrize("rows_per_chunk", [1, 4, 1000])
@pytest.mark.parametrize("single_call", [False, True])
def test_fused_sum_count_and_gradients_equal_the_plain_path(monkeypatch, rows_per_chunk, single_call):
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", rows_per_chunk * V)
    hidden, labels, head = case()
    want = grads_of(plain, hidden, labels, head)
    got = grads_of(lambda h, lab, m: linear_cross_entropy(h, lab, m, V, single_call=single_call),
                   hidden, labels, head)
    keep = labels != IGNORE_INDEX
    reference = F.cross_entropy(head(hidden)[keep], labels[keep], reduction="sum")
    torch.testing.assert_close(want[0], reference.detach(), rtol=1e-6, atol=1e-6)
    assert int(got[1]) == int(want[1]) == int(keep.sum())
    for g, w in zip(got[:1] + got[2:], want[:1] + want[2:]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_label_positions_given_by_the_host_give_the_same_loss_and_gradients():
    hidden, labels, head = case()
    positions = labelled_positions(labels)
    assert positions.tolist() == [i for i, x in enumerate(labels.reshape(-1).tolist()) if x != IGNORE_INDEX]
    want = grads_of(lambda h, lab, m: linear_cross_entropy(h, lab, m, V), hidden, labels, head)
    got = grads_of(lambda h, lab, m: linear_cross_entropy(h, lab, m, V, label_positions=positions),
                   hidden, labels, head)
    for g, w in zip(got, want):
        assert torch.equal(torch.as_tensor(g), torch.as_tensor(w))
    assert with_label_positions({"labels": labels})["label_positions"].tolist() == positions.tolist()


def test_fused_eval_path_without_grad_and_a_batch_without_targets():
    hidden, labels, head = case()
    with torch.no_grad():
        total, count = linear_cross_entropy(hidden, labels, head, V)
        ref, _ = plain(hidden, labels, head)
    torch.testing.assert_close(total, ref)
    none = torch.full_like(labels, IGNORE_INDEX)
    for single in (False, True):
        total, count = linear_cross_entropy(hidden.requires_grad_(True), none, head, V, single_call=single)
        assert total.dtype == torch.float32 and float(total.detach()) == 0.0 and int(count) == 0


def test_the_head_sees_only_labelled_rows_in_chunks(monkeypatch):
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 4 * V)
    hidden, labels, head = case()
    rows = []
    head.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    linear_cross_entropy(hidden.requires_grad_(True), labels, head, V)[0].backward()
    n_keep = int((labels != IGNORE_INDEX).sum())
    assert max(rows) == 4 and sum(rows) == 2 * n_keep  # forward + one recompute per chunk, never all 26 rows


def test_global_token_normalisation_gives_the_mean_over_every_target_of_the_step():
    """Two micro-batches, the loop's arithmetic (sum of per-batch sums / global count) = one mean CE."""
    (h1, l1, head), (h2, l2, _) = case(0), case(1)
    sums = [linear_cross_entropy(h, lab, head, V) for h, lab in ((h1, l1), (h2, l2))]
    mean = (sums[0][0] + sums[1][0]) / (sums[0][1] + sums[1][1])
    logits = head(torch.cat([h1, h2]).reshape(-1, D))
    labels = torch.cat([l1, l2]).reshape(-1)
    torch.testing.assert_close(mean, F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX),
                               rtol=1e-6, atol=1e-6)


# ---- the model's loss_only path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny("minicpmv2_6", tmp_path_factory.mktemp("tiny"), query_num=16)


def batch_with_image(seed=0, length=60):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (2, length), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -15:] = ids[0, -15:]
    labels[1, 20:30] = ids[1, 20:30]
    return dict(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids),
                position_ids=torch.arange(length).repeat(2, 1),
                pixel_values=[[torch.randn(3, 14, 14 * 12, generator=g)], []],
                tgt_sizes=[torch.tensor([[3, 4]], dtype=torch.int32), torch.zeros(0, 2, dtype=torch.int32)],
                image_bound=[torch.tensor([[2, 18]]), torch.zeros(0, 2, dtype=torch.long)])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora_peft"])
def test_model_loss_only_equals_the_logits_path_with_gradients(ckpt, lora):
    batch = batch_with_image()
    results = []
    for fused in (False, True):
        model = load_model(ckpt, dtype=torch.float32).train()
        if fused:
            assert configure_kernels(model, type("M", (), {"fused_ce": True, "vision_varlen": False})(),
                                     use_gpu=False).fused_ce
        if lora:
            torch.manual_seed(0)  # the same LoRA init in both runs; no dropout (train mode)
            model = apply_trainable_policy(model, TrainableConfig(vision="full", llm="lora"),
                                           LoraConfig(r=4, dropout=0.0))
        assert uses_fused_loss(model) == fused
        total, count = batch_loss(model, with_label_positions(batch) if fused else batch, fused=fused)
        total.backward()
        results.append((total.detach(), int(count), {n: p.grad.clone() for n, p in model.named_parameters()
                                                      if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    assert results[0][1] == results[1][1] == 25
    assert results[0][2].keys() == results[1][2].keys() and len(results[0][2]) > 20
    for name, g in results[0][2].items():
        err, scale = (results[1][2][name] - g).abs().max().item(), g.abs().max().item()
        assert err <= 1e-5 * scale + 1e-7, f"{name}: {err:.3g} vs {scale:.3g}"


def test_plan_resolves_auto_and_refuses_impossible_true(ckpt, published25):
    cfg = lambda **kw: type("M", (), {"vision_varlen": "auto", "fused_ce": "auto", "liger": "auto", **kw})()  # noqa
    m26 = load_model(ckpt, dtype=torch.float32)
    assert plan_kernels(m26, cfg(), use_gpu=False) == KernelPlan(True, True, False, False)
    assert plan_kernels(m26, cfg(vision_varlen=False, fused_ce=False), use_gpu=False) == \
        KernelPlan(False, False, False, False)
    m25 = load_model(published25, dtype=torch.float32)
    assert plan_kernels(m25, cfg(), use_gpu=False).vision_varlen is False
    with pytest.raises(ValueError, match="vision_varlen=true"):
        plan_kernels(m25, cfg(vision_varlen=True), use_gpu=False)
    with pytest.raises(ValueError, match="model.liger=true: needs CUDA"):
        plan_kernels(m26, cfg(liger=True), use_gpu=False)
    with pytest.raises(ValueError, match="fused_ce=true: needs a native model"):
        plan_kernels(torch.nn.Linear(2, 2), cfg(fused_ce=True, vision_varlen=False), use_gpu=False)
