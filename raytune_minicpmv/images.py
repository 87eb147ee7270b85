"""Open any valid image file as 8-bit RGB the same way every time (no Ray).

    from raytune_minicpmv.images import load_rgb, ImageLoadError
    img = load_rgb("photo.jpg")     # PIL.Image in mode "RGB"; raises ImageLoadError with a short reason

Rules (documented in docs/DATA.md, "Unusual images"):
- EXIF orientation is applied (a phone photo stored sideways is trained upright, as users see it).
- Animated GIF/WebP/APNG: the first frame.
- Transparency (RGBA, LA, PA, palette with a transparent colour) is composited on white. The official script's
  plain `convert("RGB")` keeps whatever colour hides under transparent pixels (often black); white is what viewers
  show and what documents/screenshots mean.
- 16-bit and 32-bit integer greyscale ("I;16", "I") is scaled to 8 bits (value >> 8 for 16-bit); a plain convert
  would clip everything above 255 to white. Float greyscale ("F") is treated as 0..1 if its maximum is <= 1, else
  as 0..255.
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
        arr = np.asarray(im, dtype=np.int64)
        shift = 8 if mode.startswith("I;16") or arr.max(initial=0) <= 65535 else 24
        return Image.fromarray(np.clip(arr >> shift, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info or mode in ("PA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        background = Image.new("RGB", im.size, WHITE)
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")
