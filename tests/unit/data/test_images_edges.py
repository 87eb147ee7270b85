"""data/images.py edges that mutation testing found unpinned (docs/TESTING.md): every 16-bit greyscale mode PIL
decodes to (big-, little-, native-endian) is scaled, not clipped, and a broken EXIF block does not make a readable
image unreadable.

Run: pytest tests/unit/data/test_images_edges.py   (about a second)
"""
import numpy as np
import pytest
from PIL import Image

from raytune_minicpmv.data.images import load_rgb, to_rgb


@pytest.mark.parametrize("mode,dtype", [("I;16", "<u2"), ("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16N", "=u2")])
def test_every_16_bit_mode_is_scaled_not_clipped(mode, dtype):
    raw = np.array([[0, 257 * 100, 65535]], dtype=dtype).tobytes()
    im = Image.frombytes(mode, (3, 1), raw)
    assert im.mode == mode and np.asarray(im.convert("RGB"))[0, :, 0].tolist() == [0, 255, 255]  # PIL clips
    out = to_rgb(im)
    assert out.mode == "RGB" and np.asarray(out)[0].tolist() == [[0, 0, 0], [100, 100, 100], [255, 255, 255]]


def test_a_broken_exif_block_does_not_make_the_image_unreadable(tmp_path):
    path = tmp_path / "broken_exif.png"
    Image.new("RGB", (4, 3), (1, 2, 3)).save(path, exif=b"\x00")  # an eXIf chunk PIL cannot parse
    with Image.open(path) as im, pytest.raises(SyntaxError):
        im.getexif()
    out = load_rgb(str(path))
    assert out.size == (4, 3) and np.asarray(out)[2, 3].tolist() == [1, 2, 3]


def test_float_nan_and_infinities_are_black_in_the_unit_range():
    # 0..1 data: NaN, +inf and -inf are 0 (they must not set the range or turn white)
    im = Image.fromarray(np.array([[0.5, np.nan, np.inf, -np.inf, 1.0]], np.float32), "F")
    assert np.asarray(to_rgb(im))[0, :, 0].tolist() == [128, 0, 0, 0, 255]


def test_palette_with_alpha_is_composited_on_white():
    im = Image.new("PA", (2, 1), (0, 0))  # palette index 0 (black), alpha 0
    im.putpalette([0, 0, 0] + [200, 0, 0] * 255)
    im.putpixel((1, 0), (1, 255))  # index 1 (red), opaque
    assert np.asarray(to_rgb(im))[0].tolist() == [[255, 255, 255], [200, 0, 0]]


def test_premultiplied_rgba_is_composited_on_white():
    im = Image.new("RGBa", (2, 1), (0, 0, 0, 0))
    im.putpixel((1, 0), (90, 0, 0, 255))
    assert np.asarray(to_rgb(im))[0].tolist() == [[255, 255, 255], [90, 0, 0]]
