"""Vision position ids and padding masks with the crops on a CUDA device (opt-in: run on the GPU machine only).

    python -m pytest -m gpu tests/gpu/test_vision_positions_gpu.py -q

The remote code takes `tgt_sizes` on the GPU, divides 1 by its int32 elements there (a float32 step), and runs
`torch.arange` / `torch.bucketize` with no device argument, i.e. on the CPU; the ids are then moved to the GPU.
Ours must give the same ids for every grid up to 70 x 70, on the crop's device. The same computation done on
the GPU (a CUDA arange) gives other buckets at some sizes, which the last check shows.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
SIDE = 70
SIZES = range(1, SIDE + 1)


def remote_code_buckets(size: torch.Tensor) -> torch.Tensor:
    """The remote code's per-axis recipe, restated; `size` is a tgt_sizes element, where the model has it."""
    boundaries = torch.arange(1 / SIDE, 1.0, 1 / SIDE)
    return torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / size), boundaries, right=True)


def remote_code_ids(tgt_sizes: torch.Tensor, max_patches: int) -> torch.Tensor:
    out = torch.zeros(len(tgt_sizes), max_patches, dtype=torch.long)
    for i in range(len(tgt_sizes)):
        h, w = tgt_sizes[i].tolist()
        rows, cols = remote_code_buckets(tgt_sizes[i][0]), remote_code_buckets(tgt_sizes[i][1])
        out[i, : h * w] = (rows[:, None] * SIDE + cols).flatten()
    return out.to(tgt_sizes.device)


def test_position_ids_on_cuda_match_the_remote_code_for_every_grid_up_to_70x70():
    from raytune_minicpmv.models.vision import navit_position_ids

    mismatched = []
    for h in SIZES:
        sizes = torch.tensor([[h, w] for w in SIZES], dtype=torch.int32, device="cuda")
        ours = navit_position_ids(sizes, SIDE, h * SIDE + 3)
        assert ours.device.type == "cpu"  # built on the host from CUDA sizes; the tower queues them to the GPU
        expected = remote_code_ids(sizes, h * SIDE + 3).cpu()
        mismatched += [(h, w) for w in SIZES if not torch.equal(ours[w - 1], expected[w - 1])]
    assert mismatched == [], f"{len(mismatched)} grids differ, e.g. {mismatched[:5]}"


def test_a_cuda_arange_would_give_other_buckets():
    """Why the ids are computed on the CPU: the same recipe with every tensor on the GPU differs at some sizes."""
    boundaries = torch.arange(1 / SIDE, 1.0, 1 / SIDE, device="cuda")
    differs = []
    for n in SIZES:
        size = torch.tensor(n, dtype=torch.int32, device="cuda")
        on_gpu = torch.bucketize(torch.arange(0, 1 - 1e-6, (1 / size).item(), device="cuda"), boundaries, right=True)
        if not torch.equal(on_gpu.cpu(), remote_code_buckets(size)):
            differs.append(n)
    assert differs == [49, 58]


@pytest.mark.parametrize("attn,dtype", [("eager", torch.float32), ("sdpa", torch.float32), ("eager", torch.bfloat16),
                                        ("sdpa", torch.bfloat16), ("flash_attention_2", torch.bfloat16)])
def test_vision_tower_on_cuda_does_not_attend_padded_patches(attn, dtype):
    from transformers import Idefics2VisionConfig

    from raytune_minicpmv.models.vision import NavitSiglipVisionTower

    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    config = Idefics2VisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                  patch_size=14, image_size=980)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = NavitSiglipVisionTower(config).to("cuda", dtype).eval()
    short, long = torch.randn(3, 14, 12 * 14), torch.randn(3, 14, 30 * 14)
    padded = torch.cat([short, 10 * torch.randn(3, 14, 18 * 14)], dim=-1)
    with torch.no_grad():
        alone = model(short[None].cuda(), torch.tensor([[3, 4]], device="cuda"))[0]
        batched = model(torch.stack([long, padded]).cuda(), torch.tensor([[5, 6], [3, 4]], device="cuda"))[1]
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(batched[:12].float(), alone.float(), rtol=tol, atol=tol)
