"""MiniCPM-V slicing against the worked examples (computed by hand from the algorithm text) and packing/normalize
against torch's unfold / ToTensor+Normalize arithmetic (the official implementation's ops)."""
import numpy as np
import pytest
import torch
from PIL import Image

from raytune_minicpmv.slicing import (ensure_divide, find_best_resize, normalize, pack_crop, plan_slices,
                                      slice_image, unpack_crop)


def test_ensure_divide_uses_bankers_round():
    assert ensure_divide(21, 14) == 28  # 1.5 -> 2
    assert ensure_divide(35, 14) == 28  # 2.5 -> 2 (banker's), not 42
    assert ensure_divide(3, 14) == 14  # never below one patch
    assert find_best_resize((448, 448), 448, 14) == (448, 448)


@pytest.mark.parametrize("size,grid,source,tile,refine,crops", [
    ((448, 448), None, (448, 448), None, None, 1),  # area == 448^2: not sliced
    ((1344, 1344), (3, 3), (448, 448), (448, 448), (1344, 1344), 10),  # ratio 9 -> candidates {8, 9}
    ((1024, 768), (2, 2), (518, 392), (518, 392), (1036, 784), 5),  # ratio 3.92 -> multiple 4 -> [2, 2]
    ((50, 50), None, (448, 448), None, None, 1),  # tiny: upscaled to ~448^2
    # 2000x500: ratio 4.98 -> multiple 5, candidates {4,5,6}; log(4) matches [4,1] exactly; tiles 500x500 -> 448x448;
    # source: aspect 4, h = int(448/2) = 224, w = 896
    ((2000, 500), (4, 1), (896, 224), (448, 448), (1792, 448), 5),
    # 4000x40: area < 448^2 -> no slices; aspect 100: h = int(44.8) = 44 -> 42, w = 4400 -> 4396
    ((4000, 40), None, (4396, 42), None, None, 1),
])
def test_worked_examples(size, grid, source, tile, refine, crops):
    plan = plan_slices(size, max_slice_nums=9)
    assert (plan.grid, plan.source_size, plan.tile_size, plan.refine_size, plan.num_crops) == (
        grid, source, tile, refine, crops)


def test_tgt_sizes_and_max_slice_nums():
    assert plan_slices((1024, 768)).tgt_sizes() == [(28, 37)] * 5  # (H/14, W/14): 1036 patches per crop
    assert plan_slices((1344, 1344), max_slice_nums=1).grid is None  # never slices
    assert plan_slices((1344, 1344), max_slice_nums=2).grid in ((1, 2), (2, 1))


def test_slice_image_crops_are_bicubic_resizes_in_row_major_order():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8))
    plan = plan_slices(img.size)
    crops = slice_image(img, plan)
    assert [c.size for c in crops] == plan.crop_sizes()
    assert np.array_equal(np.asarray(crops[0]), np.asarray(img.resize((518, 392), Image.Resampling.BICUBIC)))
    refined = np.asarray(img.resize((1036, 784), Image.Resampling.BICUBIC))
    assert np.array_equal(np.asarray(crops[2]), refined[0:392, 518:1036])  # row 0, col 1
    assert np.array_equal(np.asarray(crops[3]), refined[392:784, 0:518])  # row 1, col 0


def _official_packing(hwc: np.ndarray) -> torch.Tensor:
    # ToTensor + Normalize(0.5, 0.5) + unfold-based patch packing, with torch ops as the official code uses them.
    t = torch.from_numpy(hwc.copy()).permute(2, 0, 1).contiguous().float().div(255)
    t = (t - 0.5) / 0.5
    patches = torch.nn.functional.unfold(t, (14, 14), stride=(14, 14))
    patches = patches.reshape(3, 14, 14, -1).permute(0, 1, 3, 2).reshape(3, 14, -1)
    return patches


def test_pack_and_normalize_match_the_official_ops_bit_for_bit():
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, (392, 518, 3), dtype=np.uint8)
    ours = normalize(pack_crop(hwc))
    assert ours.shape == (3, 14, 28 * 37 * 14) and ours.dtype == np.float32
    assert torch.equal(torch.from_numpy(ours), _official_packing(hwc))
    assert ours.min() >= -1 and ours.max() <= 1
    assert np.array_equal(unpack_crop(pack_crop(hwc), (28, 37)), hwc)
