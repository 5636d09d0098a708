import io

import numpy as np
import pytest
from PIL import Image

from tasks.images import ImageRejected, decode_image, is_ignored_file


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _photo(size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _reason(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, (32, 32), **kwargs)
    return caught.value.reason


def test_each_kind_of_bad_file_has_its_reason():
    jpeg = _encode(_photo((256, 256)), "JPEG", quality=90)
    assert _reason(b"") == "empty"
    assert _reason(b"this is a text file named cat.jpg\n") == "not_an_image"
    assert _reason(jpeg[: len(jpeg) // 2]) == "corrupt"
    png = _encode(_photo(), "PNG")
    assert _reason(png[:100]) == "corrupt"
    assert _reason(jpeg, max_pixels=100) == "too_large"


def test_decompression_bomb_at_pillows_default_limit():
    # 12000 x 12000 one-bit pixels: 144 megapixels in a few kilobytes of PNG.
    bomb = _encode(Image.new("1", (12000, 12000)), "PNG")
    assert len(bomb) < 100_000
    assert _reason(bomb) == "too_large"


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "1"])
def test_every_mode_becomes_rgb_of_the_requested_size(mode):
    photo = _photo()
    if mode == "I;16":
        grey = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
        image = Image.fromarray(grey.astype("<u2"))
        assert image.mode.startswith("I;16")
        fmt = "PNG"
    else:
        image = photo.convert(mode)
        fmt = "TIFF" if mode == "CMYK" else "PNG"
    pixels = decode_image(_encode(image, fmt), (40, 30))
    assert pixels.shape == (40, 30, 3) and pixels.dtype == np.uint8
    if mode == "I;16":  # 16-bit is scaled, not clipped to white
        expected = np.asarray(photo.convert("L").resize((30, 40), Image.Resampling.BILINEAR))
        assert np.abs(pixels[..., 0].astype(int) - expected).max() <= 2


def test_transparent_pixels_are_laid_on_white():
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert (decode_image(_encode(image, "PNG"), (8, 8)) == 255).all()


def test_exif_orientation_is_applied():
    tall = Image.new("RGB", (20, 40), (255, 0, 0))
    tall.paste((0, 0, 255), (0, 0, 20, 10))  # blue band at the top
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    stored = tall.transpose(Image.Transpose.ROTATE_90)
    pixels = decode_image(_encode(stored, "JPEG", exif=exif.tobytes(), quality=95), (40, 20))
    assert pixels[2, 10, 2] > 200 and pixels[2, 10, 0] < 60  # blue at the top again
    assert pixels[35, 10, 0] > 200


def test_jpeg_draft_mode_keeps_quality():
    big = _photo((1024, 768)).resize((1024, 768))
    small = decode_image(_encode(big, "JPEG", quality=95), (64, 64))
    reference = np.asarray(big.resize((64, 64), Image.Resampling.BILINEAR), dtype=float)
    assert np.abs(small.astype(float) - reference).mean() < 12


def test_hidden_and_system_files_are_ignored():
    assert (
        is_ignored_file(".DS_Store") and is_ignored_file("Thumbs.db") and is_ignored_file("._x.jpg")
    )
    assert not is_ignored_file("cat.1.jpg")


def test_max_pixels_lowers_and_raises_the_limit():
    # Pillow's own check used to refuse anything over twice its limit whatever --max-pixels said,
    # and warned over its limit: now --max-pixels alone decides, in both directions.
    big = _encode(Image.new("1", (9500, 9500), 1), "PNG")  # 90.25 megapixels, over Pillow's 89.5
    assert _reason(big) == "too_large"
    pixels = decode_image(big, (16, 16), max_pixels=100_000_000)
    assert pixels.shape == (16, 16, 3) and (pixels == 255).all()
    assert _reason(_encode(_photo((64, 48)), "PNG"), max_pixels=64 * 48 - 1) == "too_large"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: b"<!doctype html><html><body>cat</body></html>", "not_an_image"),
        (lambda: np.random.default_rng(3).bytes(5000), "not_an_image"),
        (lambda: b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not_an_image"),  # a header alone
        (lambda: b"\xff\xd8\xff\xe0" + b"\0" * 10, "not_an_image"),
    ],
)
def test_files_that_are_not_images_are_rejected_with_a_reason(make, reason):
    assert _reason(make()) == reason


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF", "GIF"])
def test_other_formats_decode(fmt):
    photo = _photo((40, 30))
    pixels = decode_image(_encode(photo, fmt), (30, 40))
    assert pixels.shape == (30, 40, 3)
    if fmt in ("BMP", "TIFF"):  # lossless: the pixels themselves
        np.testing.assert_array_equal(pixels, np.asarray(photo))


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    pixels = decode_image(buffer.getvalue(), (16, 16))
    assert pixels[8, 8, 0] > 200 and pixels[8, 8, 2] < 60


def test_cmyk_jpeg_and_palette_transparency():
    red = Image.new("RGB", (16, 16), (220, 20, 20))
    pixels = decode_image(_encode(red.convert("CMYK"), "JPEG", quality=95), (16, 16))
    assert pixels[8, 8, 0] > 180 and pixels[8, 8, 1] < 80
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert (decode_image(_encode(palette, "PNG", transparency=0), (8, 8)) == 255).all()
