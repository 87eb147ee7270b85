"""Valid but unusual images are converted to 8-bit RGB consistently (rules in images.py / docs/DATA.md)."""
import numpy as np
import pytest
from PIL import Image

from raytune_minicpmv.data.images import ImageLoadError, load_rgb
from raytune_minicpmv.data.slicing import plan_slices


def _load(tmp_path, img, name, **save):
    path = tmp_path / name
    img.save(path, **save)
    out = load_rgb(str(path))
    assert out.mode == "RGB"
    return out


def test_grayscale_and_1bit(tmp_path):
    out = _load(tmp_path, Image.new("L", (5, 4), 77), "g.png")
    assert np.asarray(out)[0, 0].tolist() == [77, 77, 77]
    out = _load(tmp_path, Image.new("1", (5, 4), 1), "b.png")
    assert np.asarray(out)[0, 0].tolist() == [255, 255, 255]


def test_cmyk_jpeg(tmp_path):
    out = _load(tmp_path, Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "c.jpg", quality=100)
    r, g, b = np.asarray(out)[8, 8].tolist()
    assert r > 240 and g < 15 and b < 15  # pure red


def test_palette_and_transparency_composite_on_white(tmp_path):
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    assert np.asarray(_load(tmp_path, pal, "p.png"))[0, 0].tolist() == [10, 20, 30]
    pal.info["transparency"] = 0
    assert np.asarray(_load(tmp_path, pal, "pt.png", transparency=0))[0, 0].tolist() == [255, 255, 255]
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((1, 1), (200, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))  # half-transparent black over white
    arr = np.asarray(_load(tmp_path, rgba, "a.png"))
    assert arr[0, 0].tolist() == [255, 255, 255] and arr[1, 1].tolist() == [200, 0, 0]
    assert 120 <= arr[2, 2][0] <= 135
    la = Image.new("LA", (3, 3), (0, 0))
    assert np.asarray(_load(tmp_path, la, "la.png"))[0, 0].tolist() == [255, 255, 255]


def test_16bit_is_scaled_not_clipped(tmp_path):
    arr16 = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    out = np.asarray(_load(tmp_path, Image.fromarray(arr16), "16.png"))
    assert out[0, :, 0].tolist() == [0, 100, 255]


def test_32bit_integer_above_65535_is_scaled_by_its_bit_depth_not_made_black(tmp_path):
    # max 131071 has 17 bits: values >> 9; a fixed >> 24 gave 0 everywhere. Negative values are 0.
    arr = np.array([[0, 50000, 100000, 131071, -5]], dtype=np.int32)
    out = np.asarray(_load(tmp_path, Image.fromarray(arr), "i32.tif"))
    assert out[0, :, 0].tolist() == [0, 50000 >> 9, 100000 >> 9, 255, 0] == [0, 97, 195, 255, 0]
    assert np.asarray(_load(tmp_path, Image.fromarray(np.array([[2 ** 31 - 1, 2 ** 23]], np.int32)), "i31.tif")
                      )[0, :, 0].tolist() == [255, 1]  # 31 bits: >> 23
    # up to 65535 it stays 16-bit data (>> 8), as for I;16
    low = np.asarray(_load(tmp_path, Image.fromarray(np.array([[257 * 100, 65535]], np.int32)), "i16.tif"))
    assert low[0, :, 0].tolist() == [100, 255]


def test_float_images_by_range(tmp_path):
    def grey(values, name):
        return np.asarray(_load(tmp_path, Image.fromarray(np.array([values], np.float32)), name))[0, :, 0].tolist()

    assert grey([0.0, 0.5, 1.0], "f1.tif") == [0, 128, 255]  # 0..1
    assert grey([0.0, 100.0, 255.0], "f255.tif") == [0, 100, 255]  # 0..255
    # above 255: 0..2**bits(max); max 1000 has 10 bits -> / 4 (it used to clip everything above 255 to white)
    assert grey([0.0, 300.0, 1000.0, float("nan"), -7.0], "f1k.tif") == [0, 75, 250, 0, 0]
    assert grey([40000.0, 65535.0], "f16.tif") == [156, 255]  # 16 bits -> / 256


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    out = _load(tmp_path, img, "e.jpg", exif=exif.tobytes(), quality=100)
    assert out.size == (20, 40)
    assert np.asarray(out)[2, 10][0] > 200  # the left strip is now at the top


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((250, 0, 0), (0, 250, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    r, g, _ = np.asarray(load_rgb(str(path)))[4, 4].tolist()
    assert r > 200 and g < 50


@pytest.mark.parametrize("size,tgt", [((1, 1), [(32, 32)]), ((4000, 40), [(3, 314)]), ((40, 4000), [(320, 3)])])  # not symmetric: h = int(448/0.1) = 4480
def test_extreme_sizes_slice_to_valid_crops(tmp_path, size, tgt):
    out = _load(tmp_path, Image.new("RGB", size, (1, 2, 3)), "x.png")
    assert out.size == size
    assert plan_slices(out.size).tgt_sizes() == tgt


def test_not_an_image_and_missing(tmp_path):
    (tmp_path / "t.jpg").write_text("hello")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_rgb(str(tmp_path / "t.jpg"))
    with pytest.raises(ImageLoadError, match="not found"):
        load_rgb(str(tmp_path / "none.jpg"))
