"""The kernel levers on CUDA (opt-in: run on the GPU machine only): packed vision vs padded, fused linear + CE
(torch chunked, and Liger when installed) vs the logits path — outputs and gradients.

    python -m pytest -m gpu tests/gpu/test_kernels_gpu.py -q
    # Liger: pip install --no-deps --target /tmp/site .gpuwheels/liger_kernel-*.whl; PYTHONPATH=/tmp/site:$PWD

SigLIP-400M layer dims (1152 hidden, 16 heads, MLP 4304) with 2 layers and crops of the real 2.6 slicing grids
(≈ 1024 patches each, a few shapes of equal length), so CUDA runs the kernels it runs in training (flash / cuDNN
SDPA without a mask for packed runs, the masked kernel for the padded batch).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
P = 14
GRIDS = [(32, 32), (37, 28), (28, 37), (39, 26), (32, 32), (35, 29), (5, 7)]


def vision_tower(dtype):
    from transformers import Idefics2VisionConfig

    from raytune_minicpmv.models.vision import NavitSiglipVisionTower

    cfg = Idefics2VisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=2, num_attention_heads=16,
                               patch_size=P, image_size=980)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return NavitSiglipVisionTower(cfg).to("cuda", dtype).train()


def run_tower(model, crops, sizes, packed):
    if packed:
        return model(torch.cat(crops, dim=-1)[None], sizes, packed=True)
    width = max(c.shape[-1] for c in crops)
    out = model(torch.stack([F.pad(c, (0, width - c.shape[-1])) for c in crops]), sizes)
    return torch.cat([out[i, : h * w] for i, (h, w) in enumerate(sizes.tolist())])


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
def test_packed_vision_on_cuda_equals_padded_outputs_and_gradients(dtype, tol):
    g = torch.Generator(device="cuda").manual_seed(0)
    crops = [torch.randn(3, P, h * w * P, device="cuda", generator=g, dtype=dtype) for h, w in GRIDS]
    sizes = torch.tensor(GRIDS, dtype=torch.int32, device="cuda")
    results = []
    for packed in (False, True):
        model = vision_tower(dtype)
        out = run_tower(model, crops, sizes, packed)
        weights = torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1), dtype=dtype)
        (out.float() * weights.float()).sum().backward()
        results.append((out.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}))
    (ref, ref_g), (got, got_g) = results
    assert (got - ref).abs().max().item() <= tol * ref.abs().max().item()
    for name, grad in ref_g.items():
        if name.endswith("self_attn.k_proj.bias"):
            # its exact gradient is 0 (a bias added to every key shifts each query's scores by one constant, which
            # softmax ignores): both paths hold rounding noise only (bf16 on the H200: 0.005 vs 0.007)
            continue
        err, scale = (got_g[name] - grad).abs().max().item(), grad.abs().max().item()
        assert err <= tol * scale + 1e-6, f"{name}: max |diff| {err:.3g} vs max |grad| {scale:.3g}"


def packed_outputs_and_grads(crop_attention: str, cudnn: bool = True):
    """The packed 2-layer tower in bf16 over the real grids: features and every gradient."""
    g = torch.Generator(device="cuda").manual_seed(0)
    crops = [torch.randn(3, P, h * w * P, device="cuda", generator=g, dtype=torch.bfloat16) for h, w in GRIDS]
    sizes = torch.tensor(GRIDS, dtype=torch.int32, device="cuda")
    model = vision_tower(torch.bfloat16)
    model.crop_attention = crop_attention
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    try:
        out = run_tower(model, crops, sizes, packed=True)
        weights = torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1),
                              dtype=torch.bfloat16)
        (out.float() * weights.float()).sum().backward()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
    return out.detach().float(), {n: q.grad.float() for n, q in model.named_parameters()}


@pytest.mark.parametrize("variant", ["varlen", "flash"])
def test_varlen_and_flash_vision_attention_equal_the_grouped_cudnn_path(variant):
    """model.vision_attention=varlen (one varlen_attn call per layer) and model.sdpa_kernel=flash (no cuDNN
    SDPA) give the grouped cuDNN path's features and gradients to bf16 rounding."""
    ref, ref_g = packed_outputs_and_grads("grouped", cudnn=True)
    got, got_g = packed_outputs_and_grads("varlen" if variant == "varlen" else "grouped", cudnn=variant != "flash")
    assert (got - ref).abs().max().item() <= 3e-2 * ref.abs().max().item()
    for name, grad in ref_g.items():
        if name.endswith("self_attn.k_proj.bias"):  # exact gradient 0: rounding noise only (see above)
            continue
        err, scale = (got_g[name] - grad).abs().max().item(), grad.abs().max().item()
        assert err <= 3e-2 * scale + 1e-6, f"{name}: max |diff| {err:.3g} vs max |grad| {scale:.3g}"


def test_a_wrong_crop_boundary_changes_the_varlen_features():
    """Control for the test above: varlen with the crops' boundaries merged (one sequence) is NOT the grouped
    path, so the comparison can see a boundary error."""
    from raytune_minicpmv.models import vision

    ref, _ = packed_outputs_and_grads("grouped")
    real = vision.CropRuns.cu_seqlens, vision.CropRuns.longest
    vision.CropRuns.cu_seqlens = lambda self: [0, self.total]  # every crop in one attention sequence
    vision.CropRuns.longest = property(lambda self: self.total)
    try:
        got, _ = packed_outputs_and_grads("varlen")
    finally:
        vision.CropRuns.cu_seqlens, vision.CropRuns.longest = real
    # beyond the equality test's bound (H200: 0.35 of a largest feature of 5.8, the bound is 0.18)
    assert (got - ref).abs().max().item() > 3e-2 * ref.abs().max().item()


def head_case(dtype):
    torch.manual_seed(0)
    hidden = torch.randn(3, 700, 1536, device="cuda", dtype=dtype)
    labels = torch.randint(0, 151666, (3, 700), device="cuda")
    labels[:, :500] = -100
    head = torch.nn.Linear(1536, 151666, bias=False).to("cuda", dtype)
    return hidden, labels, head


def loss_and_grads(fn, hidden, labels, head):
    h = hidden.clone().requires_grad_(True)
    head.zero_grad()
    total, count = fn(h, labels, head)
    total.backward()
    return total.detach().float(), int(count), h.grad.float(), head.weight.grad.float()


def plain(h, labels, head):
    from raytune_minicpmv.models.loss import compute_loss

    return compute_loss(head(h), labels)


def assert_same(got, want, tol):
    assert got[1] == want[1]
    assert abs(got[0] - want[0]).item() <= tol * abs(want[0]).item()
    for g, w in zip(got[2:], want[2:]):
        assert (g - w).abs().max().item() <= tol * w.abs().max().item() + 1e-7


# fp32: cuBLAS sums the chunked lm_head GEMMs in another order than the one big GEMM (H200: 1.8e-5 of the max
# gradient); a wrong loss or gradient is off by O(1)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 5e-5), (torch.bfloat16, 2e-2)])
def test_torch_fused_ce_on_cuda_equals_the_logits_path(dtype, tol):
    from raytune_minicpmv.models.loss import linear_cross_entropy

    hidden, labels, head = head_case(dtype)
    want = loss_and_grads(plain, hidden, labels, head)
    got = loss_and_grads(lambda h, lab, m: linear_cross_entropy(h, lab, m, 151666), hidden, labels, head)
    assert_same(got, want, tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_liger_fused_ce_equals_the_logits_path(dtype, tol):
    pytest.importorskip("liger_kernel")
    from raytune_minicpmv.models.kernels import liger_linear_cross_entropy

    hidden, labels, head = head_case(dtype)
    want = loss_and_grads(plain, hidden, labels, head)
    got = loss_and_grads(liger_linear_cross_entropy, hidden, labels, head)
    assert_same(got, want, tol)


def test_liger_llm_kernels_keep_the_model_loss_and_gradients(tmp_path):
    """A Qwen2-shaped tiny MiniCPM-V with Liger's RMSNorm/SwiGLU/RoPE + fused CE vs the plain model, bf16."""
    pytest.importorskip("liger_kernel")
    from raytune_minicpmv.models import build_tiny, load_model
    from raytune_minicpmv.models.kernels import configure_kernels
    from raytune_minicpmv.models.loss import batch_loss

    ckpt = build_tiny("minicpmv2_6", tmp_path / "m", llm_hidden=256, llm_layers=2, query_num=16)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, 80), generator=g)
    labels = ids.masked_fill(torch.arange(80) < 50, -100)
    batch = {"input_ids": ids.cuda(), "labels": labels.cuda(), "position_ids": torch.arange(80).repeat(2, 1).cuda(),
             "pixel_values": [[torch.randn(3, P, 12 * P, generator=g).cuda()], []],
             "tgt_sizes": [torch.tensor([[3, 4]]).cuda(), torch.zeros(0, 2, dtype=torch.int32).cuda()],
             "image_bound": [torch.tensor([[2, 18]]), torch.zeros(0, 2, dtype=torch.long)]}
    switches = lambda liger: type("M", (), {"vision_varlen": True, "fused_ce": True, "liger": liger})()  # noqa
    results = []
    for liger in (False, True):
        model = load_model(ckpt, dtype=torch.bfloat16).cuda().train()
        plan = configure_kernels(model, switches(liger), use_gpu=True)
        assert plan.liger == liger and model.fused_ce_impl == ("liger" if liger else "torch")
        total, count = batch_loss(model, batch, fused=True)
        total.backward()
        results.append((float(total), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}))
    assert abs(results[1][0] - results[0][0]) <= 2e-2 * abs(results[0][0])
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        err, scale = (results[1][1][name] - grad).abs().max().item(), grad.abs().max().item()
        assert err <= 5e-2 * scale + 1e-5, f"{name}: {err:.3g} vs {scale:.3g}"


def test_compiled_vision_layers_after_peft_train_the_trained_copy(tmp_path):
    """model.compile_vision: compiled after PEFT copies vpm (modules_to_save); same features, and the gradients
    reach the trained copy (a module compiled before the copy would run the frozen original)."""
    from raytune_minicpmv.config.schema import LoraConfig, TrainableConfig
    from raytune_minicpmv.models import apply_trainable_policy, build_tiny, load_model
    from raytune_minicpmv.models.kernels import compile_vision_layers

    ckpt = build_tiny("minicpmv2_6", tmp_path / "m", query_num=16)
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(3, P, h * w * P, generator=g).cuda() for h, w in GRIDS[-1:] + [(3, 4), (4, 3)]]
    sizes = torch.tensor([[5, 7], [3, 4], [4, 3]], dtype=torch.int32).cuda()
    feats = []
    for compiled in (False, True):
        model = load_model(ckpt, dtype=torch.float32)
        model.vision_varlen = True
        torch.manual_seed(0)
        model = apply_trainable_policy(model, TrainableConfig(vision="full", llm="lora"), LoraConfig(r=4, dropout=0))
        model.cuda().train()
        if compiled:
            assert compile_vision_layers(model) == 2 * model.get_base_model().config.vision_layers  # copy + original
        base = model.get_base_model()
        out = base.image_features(crops, sizes)
        out.sum().backward()
        trained = [p for n, p in model.named_parameters() if "vpm" in n and "modules_to_save" in n]
        assert trained and all(p.grad is not None for p in trained)
        feats.append(out.detach())
    torch.testing.assert_close(feats[1], feats[0], rtol=1e-4, atol=1e-4)


def test_the_resampler_attention_builds_on_the_gpu_device():
    """Built under `with torch.device("cuda")` (the benchmark's workload build, accelerate-style loaders): its own
    in_proj init draws on the CPU and copies in (a CPU generator can't fill a CUDA tensor)."""
    from raytune_minicpmv.models.resampler import ResamplerAttention

    with torch.device("cuda"):
        attn = ResamplerAttention(64, 4)
    w = attn.in_proj_weight.detach()
    assert w.is_cuda and bool(torch.isfinite(w).all()) and 0 < float(w.abs().max()) <= (6.0 / 256) ** 0.5
