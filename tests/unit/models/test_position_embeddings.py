"""Position embeddings, bit for bit against the remote code's recipe: the vision tower's NaViT position ids for
EVERY patch grid up to 70 x 70, and the resampler's 2D sin-cos table.

The references are written here from the recipe (docs/MODELS.md, "Vision tower" and "Resampler"), not through the
package's functions. The recipe, per axis of n patches: fractional coordinates `arange(0, 1 - 1e-6, 1/n)` with
`1/n` a float32 tensor (1 divided by the int32 `tgt_sizes` element), on the CPU; buckets
`bucketize(coords, arange(1/70, 1.0, 1/70), right=True)`; patch (r, c) -> `bucket_h[r] * 70 + bucket_w[c]`,
padding slots 0.

Run: pytest tests/unit/models/test_position_embeddings.py   (~6 s)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raytune_minicpmv.models.resampler import Resampler, sincos_2d
from raytune_minicpmv.models.vision import navit_position_ids

SIDE = 70
SIZES = range(1, SIDE + 1)


def remote_code_buckets(n: int) -> torch.Tensor:
    """The remote code's calls, restated: the int32 size, `1 / size` (float32), CPU arange, bucketize right."""
    size = torch.tensor([n, n], dtype=torch.int32)[0]  # an element of tgt_sizes
    boundaries = torch.arange(1 / SIDE, 1.0, 1 / SIDE)
    return torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / size), boundaries, right=True)


def cpu_arange_float32(start: float, end: float, step: float) -> np.ndarray:
    """torch.arange's float32 output on the CPU, written out (measured on torch 2.13, AVX512/AVX2/default dispatch).

    The kernel works in double but vectorised: 8-wide blocks, each from a base `start + b*step` rounded to float32,
    plus `k*step`, rounded; full blocks go two at a time (16 elements) and the remaining ones are `start + i*step`
    rounded. This is why no plain float32 formula such as `fl32(i * fl32(1/n))` gives the remote code's values.
    """
    n = int(np.ceil((end - start) / step))
    out = np.empty(n, np.float32)
    vectorised = n - n % 16
    for i in range(n):
        if i < vectorised:
            base = i - i % 8
            out[i] = np.float32(float(np.float32(start + step * base)) + (i - base) * step)
        else:
            out[i] = np.float32(start + step * i)
    return out


def formula_buckets(n: int, step_of=lambda n: float(np.float32(1) / np.float32(n)), arange=cpu_arange_float32):
    """The same buckets as plain float32 arithmetic (numpy): no torch op involved."""
    boundaries = arange(1 / SIDE, 1.0, 1 / SIDE)
    return np.searchsorted(boundaries, arange(0.0, 1 - 1e-6, step_of(n)), side="right")


def expected_ids(h: int, w: int, buckets, max_patches: int) -> torch.Tensor:
    rows, cols = torch.as_tensor(buckets(h)), torch.as_tensor(buckets(w))
    out = torch.zeros(max_patches, dtype=torch.long)
    out[: h * w] = (rows[:, None] * SIDE + cols[None, :]).reshape(-1)
    return out


@pytest.mark.parametrize("reference", [remote_code_buckets, formula_buckets],
                         ids=["remote-code-ops", "float32-formula"])
def test_navit_position_ids_match_the_reference_for_every_grid_up_to_70x70(reference):
    table = {n: reference(n) for n in SIZES}
    mismatched = []
    for h in SIZES:
        sizes = torch.tensor([[h, w] for w in SIZES], dtype=torch.int32)
        max_patches = h * SIDE + 3  # a few padding slots even for the largest crop of the batch
        ids = navit_position_ids(sizes, SIDE, max_patches)
        assert ids.shape == (SIDE, max_patches) and ids.dtype == torch.long
        for w in SIZES:
            if not torch.equal(ids[w - 1], expected_ids(h, w, table.get, max_patches)):
                mismatched.append((h, w))
    assert mismatched == [], f"{len(mismatched)} of {SIDE * SIDE} grids differ, e.g. {mismatched[:5]}"


def test_the_two_references_agree_and_the_shortcuts_do_not():
    """The formula above is the remote code's arithmetic; the simpler ones differ exactly at the sizes seen."""
    for n in SIZES:
        assert np.array_equal(formula_buckets(n), remote_code_buckets(n).numpy()), n

    def differs_at(**variant) -> list[int]:
        return [n for n in SIZES if not np.array_equal(formula_buckets(n, **variant), formula_buckets(n))]

    def python_float_step(n):
        return 1 / n

    def plain_float32(start, end, step):  # fl32(start + i*step), float32 operands, one rounding
        n = int(np.ceil((end - start) / step))
        return (float(np.float32(start)) + np.arange(n) * float(np.float32(step))).astype(np.float32)

    assert differs_at(step_of=python_float_step) == [25, 49, 50, 55, 58]
    assert differs_at(arange=plain_float32) == [49, 58]  # also where a CUDA arange differs (tests/gpu)
    assert not np.array_equal(formula_buckets(25), np.arange(25) * SIDE // 25)  # the integer shortcut


def test_navit_position_ids_stay_on_the_crop_device_and_pad_with_zero():
    ids = navit_position_ids(torch.tensor([[70, 70], [35, 2], [25, 25]]), SIDE, SIDE * SIDE)
    assert ids.device == torch.device("cpu")
    assert torch.equal(ids[0], torch.arange(SIDE * SIDE))  # the full grid is the identity
    assert torch.equal(ids[1, :70].reshape(35, 2)[:, 0] // SIDE, torch.arange(0, 70, 2))  # every other row
    assert torch.equal(ids[2, 625:], torch.zeros(SIDE * SIDE - 625, dtype=torch.long))


def remote_code_sincos(dim: int, height: int, width: int) -> np.ndarray:
    """MAE 2D sin-cos, float32 numpy as the remote code builds it; meshgrid with w first, so half 1 = column."""
    grid_w, grid_h = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))

    def one_axis(d, pos):
        omega = np.arange(d // 2, dtype=np.float32)
        omega /= d / 2.0
        omega = 1.0 / 10000 ** omega
        angles = np.einsum("hw,d->hwd", pos, omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)

    return np.concatenate([one_axis(dim // 2, grid_w), one_axis(dim // 2, grid_h)], axis=-1)


@pytest.mark.parametrize("dim", [64, 3584])  # tiny test models, and MiniCPM-V 2.6's LLM width
def test_resampler_sincos_table_is_the_remote_codes_float32_table(dim):
    table = sincos_2d(dim, 70, 70)
    assert table.dtype == torch.float32 and table.shape == (70, 70, dim)
    assert np.array_equal(table.numpy(), remote_code_sincos(dim, 70, 70))  # exact: same dtype at every step


def test_resampler_uses_the_table_and_regrows_it_exactly():
    resampler = Resampler(num_queries=4, embed_dim=64, kv_dim=32)
    assert torch.equal(resampler.pos_embed, torch.from_numpy(remote_code_sincos(64, 70, 70)))
    with torch.no_grad():
        resampler(torch.randn(1, 3 * 72, 32), torch.tensor([[3, 72]]))  # wider than the 70 x 70 cache
    assert resampler.max_size == (70, 72)
    assert torch.equal(resampler.pos_embed, torch.from_numpy(remote_code_sincos(64, 70, 72)))
