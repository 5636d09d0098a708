"""Generated awkward inputs for the tests: fuzzed image files, and a corpus of every kind of
file a user's folder may hold."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = ("JPEG", "PNG", "GIF", "WEBP")


def _valid(fmt: str, rng: np.random.Generator) -> bytes:
    size = tuple(int(s) for s in rng.integers(8, 48, 2))
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def fuzzed_images(count: int = 500, seed: int = 0) -> list[tuple[str, bytes]]:
    """``count`` files made from valid JPEG, PNG, GIF and WebP files by truncating, flipping
    bits and splicing two files, with a fixed seed."""
    rng = np.random.default_rng(seed)
    out = []
    for index in range(count):
        fmt = FORMATS[index % len(FORMATS)]
        data = bytearray(_valid(fmt, rng))
        kind = ("truncate", "flip", "splice")[index // len(FORMATS) % 3]
        if kind == "truncate":
            data = data[: int(rng.integers(1, len(data)))]
        elif kind == "flip":
            for _ in range(int(rng.integers(1, 12))):
                position = int(rng.integers(0, len(data)))
                data[position] ^= 1 << int(rng.integers(0, 8))
        else:
            other = _valid(FORMATS[int(rng.integers(0, len(FORMATS)))], rng)
            cut = int(rng.integers(1, len(data)))
            data = data[:cut] + other[int(rng.integers(0, len(other))) :]
        out.append((f"fuzz_{index:04d}_{kind}.{fmt.lower()}", bytes(data)))
    return out


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _photo(rng: np.random.Generator, size=(40, 32)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def write_bad_input_corpus(root: Path) -> dict[str, str | None]:
    """Write a dataset of every awkward kind under ``root`` (classes ``good``, ``odd``, an empty
    class ``hollow`` is not written: empty classes are tested apart) and return
    ``{relative path (escaped): expected reject reason, or None if it must give rows}``."""
    from storage.names import escape_name

    rng = np.random.default_rng(0)
    good, odd = root / "good", root / "odd"
    (good / "nested" / "deeper").mkdir(parents=True)
    odd.mkdir(parents=True)
    expected: dict[str, str | None] = {}

    def put(folder: Path, name: str | bytes, data: bytes, reason: str | None) -> None:
        path = os.path.join(os.fsencode(folder), name if isinstance(name, bytes) else name.encode())
        with open(path, "wb") as handle:
            handle.write(data)
        relative = os.fsdecode(os.path.relpath(path, os.fsencode(root)))
        expected[escape_name(relative)] = reason

    photo = _photo(rng)
    jpeg, png = _encode(photo, "JPEG", quality=90), _encode(photo, "PNG")
    put(good, "plain.jpg", jpeg, None)
    put(good, "with spaces and ünïcode 日本.jpg", jpeg, None)
    put(good, b"caf\xe9 latin1.jpg", jpeg, None)  # a name that is not UTF-8
    put(good, "back\\slash.jpg", jpeg, None)
    put(good / "nested" / "deeper", "inside.png", png, None)
    put(good, "photo.webp", _encode(photo, "WEBP"), None)
    put(good, "photo.bmp", _encode(photo, "BMP"), None)
    put(good, "photo.tiff", _encode(photo, "TIFF"), None)
    put(
        good,
        "sixteen.png",
        _encode(
            Image.fromarray((np.asarray(photo.convert("L"), np.uint16) * 257).astype("<u2")), "PNG"
        ),
        None,
    )
    put(good, "cmyk.jpg", _encode(photo.convert("CMYK"), "JPEG"), None)
    put(good, "grey.jpg", _encode(photo.convert("L"), "JPEG"), None)
    palette = photo.convert("P")
    put(good, "palette.png", _encode(palette, "PNG", transparency=0), None)
    put(good, "rgba.png", _encode(photo.convert("RGBA"), "PNG"), None)
    frames = [_photo(rng), _photo(rng)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    put(good, "animated.gif", buffer.getvalue(), None)
    exif = Image.Exif()
    exif[0x0112] = 6
    put(good, "rotated.jpg", _encode(photo, "JPEG", exif=exif.tobytes()), None)
    put(odd, "zero.jpg", b"", "empty")
    put(odd, "truncated.jpg", jpeg[: len(jpeg) // 2], "corrupt")
    put(odd, "truncated.png", png[: len(png) // 2], "corrupt")
    put(odd, "notes.jpg", b"just some text\n", "not_an_image")
    put(odd, "page.jpg", b"<!doctype html><title>x</title>", "not_an_image")
    put(odd, "random.jpg", rng.bytes(3000), "not_an_image")
    put(odd, "bomb.png", _encode(Image.new("1", (12000, 12000)), "PNG"), "too_large")
    put(odd, "fine.jpg", jpeg, None)  # the class needs a usable image
    os.symlink("loop.jpg", odd / "loop.jpg")  # a symlink loop
    expected["odd/loop.jpg"] = "unreadable"
    os.symlink("/nonexistent/photo.jpg", odd / "dangling.jpg")
    expected["odd/dangling.jpg"] = "unreadable"
    # Unreadable even for root: reading /proc/self/mem at offset 0 fails with EIO.
    os.symlink("/proc/self/mem", odd / "unreadable.jpg")
    expected["odd/unreadable.jpg"] = "unreadable"
    (odd / ".DS_Store").write_bytes(b"\0\0")  # hidden: neither rows nor a reject
    (good / "Thumbs.db").write_bytes(b"\0\0")
    return expected


SCENE_CLASSES = ("circles", "squares", "lines")


def scene(label: str, rng: np.random.Generator, size: int = 128) -> Image.Image:
    """A random scene of one class: 10 to 24 shapes of the class's kind (circles, squares or
    lines), of random colours, sizes and places, on a random background. Scenes differ from one
    another about as photos do in a pretrained embedding (the most similar two of 90 at cosine
    0.954, a copy re-encoded at JPEG quality 75 at 0.967 or more), and their classes are
    learnable from it (5-fold accuracy 1.0): what the audit's tests need."""
    from PIL import ImageDraw

    def colour() -> tuple[int, ...]:
        return tuple(int(v) for v in rng.integers(0, 256, 3))

    image = Image.new("RGB", (size, size), colour())
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(10, 25))):
        fill = colour()
        x, y = (int(v) for v in rng.integers(0, size, 2))
        r = int(rng.integers(4, 14))
        if label == "circles":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif label == "squares":
            draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
        else:
            draw.line([x - 2 * r, y - 2 * r, x + 2 * r, y + 2 * r], fill=fill, width=3)
    return image


def write_scenes(root: Path, per_class: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for label in SCENE_CLASSES:
        (root / label).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            scene(label, rng).save(root / label / f"{label}_{index:04d}.jpg", quality=90)
    return root


def write_out_of_distribution(root: Path, per_kind: int = 4, size: int = 64, seed: int = 0) -> Path:
    """Images no classifier of these tests was trained on: uniform noise, flat colours and
    black text on white, ``per_kind`` of each, as PNG."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    for index in range(per_kind):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"noise_{index}.png")
        flat = tuple(int(v) for v in rng.integers(0, 256, 3))
        Image.new("RGB", (size, size), flat).save(root / f"flat_{index}.png")
        text = Image.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(text)
        for line in range(5):
            draw.text((2, 2 + 12 * line), " ".join(rng.choice(words, 2)), fill=(0, 0, 0))
        text.save(root / f"text_{index}.png")
    return root
