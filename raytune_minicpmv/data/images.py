"""Open any valid image file as 8-bit RGB the same way every time (no Ray).

    from raytune_minicpmv.data.images import load_rgb, ImageLoadError
    img = load_rgb("photo.jpg")     # PIL.Image in mode "RGB"; raises ImageLoadError with a short reason

Rules (documented in docs/DATA.md, "Unusual images"):
- EXIF orientation is applied (a phone photo stored sideways is trained upright, as users see it).
- Animated GIF/WebP/APNG: the first frame.
- Transparency (RGBA, LA, PA, palette with a transparent colour) is composited on white. The official script's
  plain `convert("RGB")` keeps whatever colour hides under transparent pixels (often black); white is what viewers
  show and what documents/screenshots mean.
- 16-bit and 32-bit integer greyscale ("I;16", "I") is scaled to 8 bits; a plain convert would clip everything
  above 255 to white. The range is 0..2**bits, bits = the bit length of the image's maximum but at least 16:
  value >> (bits - 8). So 16-bit data is >> 8 as before, and an image whose values exceed 65535 keeps its maximum
  at 128..255 (a fixed >> 24 made such images near-black). Negative values are 0.
- Float greyscale ("F"): 0..1 when its maximum is <= 1, 0..255 when <= 255, else 0..2**bits(max) (the smallest
  power of two above the maximum maps to 256). NaN, infinities and negative values are 0.
- CMYK, YCbCr, LAB, 1-bit and greyscale go through PIL's conversion to RGB.
An unreadable, truncated or non-image file raises ImageLoadError (the pipeline turns it into a bad record).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

WHITE = (255, 255, 255)


class ImageLoadError(ValueError):
    """The file is missing, not an image, or cannot be decoded."""


def load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            if getattr(im, "is_animated", False):
                im.seek(0)
            im.load()
            return to_rgb(ImageOps.exif_transpose(im) if _has_orientation(im) else im)
    except FileNotFoundError:
        raise ImageLoadError(f"image file not found: {path}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"not an image (PIL cannot identify it): {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"cannot decode image {path}: {e}") from None


def _has_orientation(im: Image.Image) -> bool:
    try:
        return im.getexif().get(0x0112, 1) not in (0, 1)  # 0x0112 = Orientation
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make a readable image unreadable
        return False


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB (see the module rules)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.clip(np.asarray(im, dtype=np.int64), 0, None)
        return _grey(arr >> _shift(int(arr.max(initial=0))))
    if mode == "F":
        arr = np.clip(np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0), 0, None)
        top = float(arr.max(initial=0.0))
        if top <= 1.0:
            return _grey(np.rint(arr * 255.0))
        if top <= 255.0:
            return _grey(np.rint(arr))
        return _grey(np.floor(arr / 2.0 ** _shift(int(np.ceil(top)), min_bits=9)))
    if mode == "P" and "transparency" in im.info or mode in ("PA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        background = Image.new("RGB", im.size, WHITE)
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


def _shift(top: int, min_bits: int = 16) -> int:
    # The right shift that maps [0, 2**bits) to [0, 256), bits = the bit length of the maximum, at least min_bits.
    return max(min_bits, top.bit_length()) - 8


def _grey(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L").convert("RGB")
