"""MiniCPM-V image slicing and patch packing, written from the algorithm description (no Ray, no torch).

    from raytune_minicpmv.data.slicing import plan_slices, slice_image, pack_crop, normalize
    plan = plan_slices((1024, 768), max_slice_nums=9)   # grid (2, 2), source 518x392, 4 slices of 518x392
    crops = slice_image(rgb_pil_image, plan)             # [source, row0col0, row0col1, row1col0, ...] as PIL RGB
    packed = pack_crop(np.asarray(crops[0]))             # uint8 [3, 14, N*14], N = (H/14)*(W/14) patches
    pixels = normalize(packed)                           # float32 in [-1, 1], = ToTensor() + Normalize(0.5, 0.5)

Behaviour that must match the pretrained models bit for bit (they were trained and are served this way): the
constants (scale resolution 448, patch 14), Python's banker's `round` in `ensure_divide`, `int()` truncation in
`find_best_resize`, the candidate-grid order with a strict `<` (first best wins), PIL BICUBIC resizing of the whole
image to the source size and, separately, to the refine size before cutting row-major tiles, and the packing of
each crop's 14x14 patches side by side in raster order.

Packing and normalization are split so the pipeline can ship uint8 crops (4x smaller than float32) and normalize
in the train worker's collate. Both are elementwise/permutation steps, so the order does not change the values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

SCALE_RESOLUTION = 448
PATCH_SIZE = 14
RESAMPLE = Image.Resampling.BICUBIC


@dataclass(frozen=True)
class SlicePlan:
    """Where every crop of one image comes from. Sizes are (width, height) like PIL."""

    original_size: tuple[int, int]
    source_size: tuple[int, int]  # the whole image, resized
    grid: Optional[tuple[int, int]]  # (cols, rows), None when the image is not sliced
    refine_size: Optional[tuple[int, int]]  # the whole image resized before cutting tiles
    tile_size: Optional[tuple[int, int]]  # one tile

    @property
    def num_crops(self) -> int:
        return 1 + (self.grid[0] * self.grid[1] if self.grid else 0)

    def crop_sizes(self) -> list[tuple[int, int]]:
        return [self.source_size] + [self.tile_size] * (self.num_crops - 1)

    def tgt_sizes(self, patch_size: int = PATCH_SIZE) -> list[tuple[int, int]]:
        """(H/14, W/14) per crop, the order the model's `tgt_sizes` uses."""
        return [(h // patch_size, w // patch_size) for w, h in self.crop_sizes()]


def ensure_divide(length: float, patch_size: int) -> int:
    # round() is Python's banker's rounding on purpose: it is what the models were trained with.
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(size: tuple[float, float], scale_resolution: int, patch_size: int,
                     allow_upscale: bool = False) -> tuple[int, int]:
    """Keep the aspect ratio, aim for an area of scale_resolution^2, sides multiples of patch_size."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        aspect = width / height
        height = int(scale_resolution / math.sqrt(aspect))
        width = int(height * aspect)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def best_grid(size: tuple[int, int], max_slice_nums: int, scale_resolution: int) -> Optional[tuple[int, int]]:
    """(cols, rows) of slices, or None for an image small enough (or max_slice_nums=1) to stay whole."""
    width, height = size
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slice_nums)
    if multiple <= 1:
        return None
    log_ratio = math.log(width / height)
    best, best_error = (1, 1), float("inf")
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > max_slice_nums:
            continue
        for cols in range(1, n + 1):
            if n % cols:
                continue
            error = abs(log_ratio - math.log(cols / (n // cols)))
            if error < best_error:  # strict: the first best grid wins
                best, best_error = (cols, n // cols), error
    return best


def plan_slices(size: tuple[int, int], max_slice_nums: int = 9, scale_resolution: int = SCALE_RESOLUTION,
                patch_size: int = PATCH_SIZE) -> SlicePlan:
    """Compute the crop geometry of one image of `size` = (width, height)."""
    grid = best_grid(size, max_slice_nums, scale_resolution)
    if grid is None:  # small images are upscaled to ~448^2 area
        return SlicePlan(size, find_best_resize(size, scale_resolution, patch_size, allow_upscale=True), None, None,
                         None)
    source = find_best_resize(size, scale_resolution, patch_size, allow_upscale=False)
    cols, rows = grid
    refine_w, refine_h = ensure_divide(size[0], cols), ensure_divide(size[1], rows)
    tile = find_best_resize((refine_w / cols, refine_h / rows), scale_resolution, patch_size, allow_upscale=True)
    return SlicePlan(size, source, grid, (tile[0] * cols, tile[1] * rows), tile)


def slice_image(image: Image.Image, plan: SlicePlan) -> list[Image.Image]:
    """The crops of an RGB image: [source, then tiles row by row (y outer, x inner)]."""
    crops = [image.resize(plan.source_size, RESAMPLE)]
    if plan.grid is None:
        return crops
    refined = image.resize(plan.refine_size, RESAMPLE)
    (cols, rows), (tw, th) = plan.grid, plan.tile_size
    for r in range(rows):
        for c in range(cols):
            crops.append(refined.crop((c * tw, r * th, (c + 1) * tw, (r + 1) * th)))
    return crops


def pack_crop(hwc: np.ndarray, patch_size: int = PATCH_SIZE) -> np.ndarray:
    """[H, W, 3] -> [3, p, N*p]: patches laid side by side in raster order (the 2.5/2.6 `batch_vision` layout).

    out[c, i, (r*Wp + q)*p + j] = hwc[r*p + i, q*p + j, c], with Wp = W/p. One reshape + one transpose + one copy.
    """
    h, w, ch = hwc.shape
    hp, wp = h // patch_size, w // patch_size
    blocks = hwc.reshape(hp, patch_size, wp, patch_size, ch)  # (r, i, q, j, c)
    return np.ascontiguousarray(blocks.transpose(4, 1, 0, 2, 3)).reshape(ch, patch_size, hp * wp * patch_size)


def unpack_crop(packed: np.ndarray, tgt_size: tuple[int, int], patch_size: int = PATCH_SIZE) -> np.ndarray:
    """Inverse of `pack_crop` for one crop with tgt_size (H/p, W/p): returns [H, W, 3] (debugging, tests)."""
    hp, wp = tgt_size
    ch = packed.shape[0]
    blocks = packed.reshape(ch, patch_size, hp, wp, patch_size)  # (c, i, r, q, j)
    return blocks.transpose(2, 1, 3, 4, 0).reshape(hp * patch_size, wp * patch_size, ch)


def normalize(pixels_uint8: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1], bit-identical to torchvision ToTensor() then Normalize(mean=0.5, std=0.5).

    Same float32 operations in the same order: x / 255, then (x - 0.5) / 0.5.
    """
    x = pixels_uint8.astype(np.float32)
    x /= np.float32(255.0)
    x -= np.float32(0.5)
    x /= np.float32(0.5)
    return x
