"""MiniCPM-V slicing against the worked examples (computed by hand from the algorithm text) and packing/normalize
against torch's unfold / ToTensor+Normalize arithmetic (the official implementation's ops)."""
import numpy as np
import pytest
import torch
from PIL import Image

from raytune_minicpmv.data.slicing import (ensure_divide, find_best_resize, normalize, pack_crop, plan_slices,
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
    assert plan_slices((1344, 1344), max_slice_nums=2).grid == (1, 2)  # tie: the first candidate [1, 2] wins


# Worked by hand from the official algorithm (docs: minicpmv-facts 5.2). Grids are (cols, rows); candidates are
# listed n = multiple-1, multiple, multiple+1 and, per n, cols = 1..n; a strict "<" keeps the first of equal errors.
# refine: rw = ensure_divide(W, cols), rh = ensure_divide(H, rows); tile = find_best_resize((rw/cols, rh/rows),
# upscale) and refine = (tile_w * cols, tile_h * rows).
@pytest.mark.parametrize("size,max_slices,grid,source,tile,refine", [
    # square, area ratio 1.31 / 1.79 -> multiple 2, candidates n=2: [1,2] and [2,1] both err ln 2 -> [1,2] wins.
    # tile from (512/1, 512/2) = (512, 256): aspect 2, h = int(448/sqrt 2) = 316 -> 322, w = 632 -> 630
    ((512, 512), 9, (1, 2), (448, 448), (630, 322), (630, 644)),
    ((600, 600), 9, (1, 2), (448, 448), (630, 322), (630, 644)),  # tile from (600, 300): the same
    # 700^2: ratio 2.44 -> multiple 3, n=2 [1,2] err ln 2 (ties [2,1]), n=4 [2,2] err 0 -> (2,2); tile 350^2 -> 448^2
    ((700, 700), 9, (2, 2), (448, 448), (448, 448), (896, 896)),
    # 1050^2: ratio 5.49 -> multiple 6, n in {5,6,7}: [2,3] and [3,2] are a tie on paper (ln 1.5) but not in
    # float64: |0 - log(2/3)| = 0.40546510810816444 > |0 - log(3/2)| = 0.4054651081081644 -> [3,2] (3 cols, 2 rows).
    # tile from (1050/3, 1050/2) = (350, 525): aspect 2/3, h = int(548.69) = 548 -> 546, w = int(365.33) = 365 -> 364
    ((1050, 1050), 9, (3, 2), (448, 448), (364, 546), (1092, 1092)),
    # 1500x700: ratio 5.23 -> multiple 6; log ratio 0.762, best [3,2] (err 0.357). tile from (1500/3, 700/2) =
    # (500, 350): aspect 1.4286, h = int(374.82) = 374 -> 378, w = int(534.29) = 534 -> 532.
    # source: aspect 2.1429, h = int(306.04) = 306 -> 308, w = int(655.71) = 655 -> 658
    ((1500, 700), 9, (3, 2), (658, 308), (532, 378), (1596, 756)),
    # the same image upright: best [2,3]; tile from (700/2, 1500/3) = (350, 500): aspect 0.7, h = int(535.46) = 535
    # -> 532, w = int(374.5) = 374 -> 378; source h = int(655.80) = 655 -> 658, w = int(305.67) = 305 -> 308
    ((700, 1500), 9, (2, 3), (308, 658), (378, 532), (756, 1596)),
    # 1000x500: ratio 2.49 -> multiple 3; [2,1] matches ln 2 exactly; tile from (500, 500) -> 448^2.
    # source: aspect 2, h = 316 -> 322, w = 632 -> 630
    ((1000, 500), 9, (2, 1), (630, 322), (448, 448), (896, 448)),
    ((500, 1000), 9, (1, 2), (322, 630), (448, 448), (448, 896)),  # source h = int(633.57) -> 630, w = 316 -> 322
    # 1001x333: ratio 1.66 -> multiple 2, n in {2,3}: [3,1] (err 0.002). rw = ensure_divide(1001, 3) = 334 * 3 =
    # 1002 (not 1001), tile from (334, 333): h = int(447.33) = 447 -> 448, w = int(448.34) = 448.
    # source: aspect 3.006, h = int(258.39) = 258 -> 252, w = int(775.55) = 775 -> 770
    ((1001, 333), 9, (3, 1), (770, 252), (448, 448), (1344, 448)),
    # 515x500: ratio 1.28 -> multiple 2, n in {2,3}; log ratio 0.0296: [2,1] (err 0.664 < 0.723 for [1,2]).
    # rw = ensure_divide(515, 2) = round(257.5) * 2 = 258 * 2 = 516 (banker's, even), rh = 500. tile from (258, 500):
    # aspect 0.516, h = int(623.67) = 623 -> round(44.5) = 44 -> 616, w = int(321.47) = 321 -> 322.
    # (without the ensure_divide, from (257.5, 500): h = 624 -> 630.) source: h = int(441.43) = 441 -> round(31.5)
    # = 32 -> 448, w = int(454.23) = 454 -> 448
    ((515, 500), 9, (2, 1), (448, 448), (322, 616), (644, 616)),
    # 2000x500 with max_slice_nums=2: multiple min(5, 2) = 2, only n=2: [2,1] (err ln 2 < 3 ln 2).
    # tile from (2000/2, 500/1) = (1000, 500): aspect 2 -> (630, 322)
    ((2000, 500), 2, (2, 1), (896, 224), (630, 322), (1260, 322)),
])
def test_tie_breaks_and_non_square_grids(size, max_slices, grid, source, tile, refine):
    plan = plan_slices(size, max_slice_nums=max_slices)
    assert (plan.grid, plan.source_size, plan.tile_size, plan.refine_size) == (grid, source, tile, refine)
    cols, rows = grid
    assert plan.tgt_sizes() == [(source[1] // 14, source[0] // 14)] + [(tile[1] // 14, tile[0] // 14)] * (cols * rows)


def test_non_square_grid_tiles_are_cut_row_major_from_the_refined_image():
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (700, 1500, 3), dtype=np.uint8))  # 1500 wide: grid 3 cols x 2 rows
    crops = slice_image(img, plan_slices(img.size))
    refined = np.asarray(img.resize((1596, 756), Image.Resampling.BICUBIC))
    assert len(crops) == 7 and all(c.size == (532, 378) for c in crops[1:])
    assert np.array_equal(np.asarray(crops[3]), refined[0:378, 1064:1596])  # row 0, col 2
    assert np.array_equal(np.asarray(crops[4]), refined[378:756, 0:532])  # row 1, col 0


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


def test_resize_without_upscale_only_rounds_an_image_that_is_not_larger_than_the_target_area():
    # Not larger than 448^2 and no upscale: each side is only rounded to a multiple of 14 (default allow_upscale).
    assert find_best_resize((300, 200), 448, 14) == (ensure_divide(300, 14), ensure_divide(200, 14)) == (294, 196)
    # Exactly 448^2 is "not larger" as well: resizing it would truncate 392 to 391 and give (504, 392).
    assert find_best_resize((512, 392), 448, 14) == (518, 392)
    w, h = find_best_resize((300, 200), 448, 14, allow_upscale=True)  # upscaled to ~448^2 with the aspect kept
    assert (w, h) == (546, 364) and abs(w * h - 448 * 448) < 0.01 * 448 * 448


def test_default_max_slice_nums_is_nine():
    # 4000x2000 wants 40 slices: capped at 9 the candidates are n in {8, 9}, and [4, 2] matches the 2:1 ratio;
    # capped at 10 they are {9, 10} and [5, 2] wins.
    assert plan_slices((4000, 2000)).grid == plan_slices((4000, 2000), max_slice_nums=9).grid == (4, 2)
    assert plan_slices((4000, 2000), max_slice_nums=10).grid == (5, 2)


def test_tgt_sizes_are_ints():
    # They become the model's int32 `tgt_sizes` and index the position tables: 28.0 would not do.
    for size in ((1024, 768), (50, 50)):
        assert all(type(v) is int for hw in plan_slices(size).tgt_sizes() for v in hw)


def test_the_plan_keeps_the_original_size():
    for size in ((50, 40), (1024, 768)):  # not sliced, sliced
        assert plan_slices(size).original_size == size
