"""Reading and decoding one image file into an RGB array of a model's input size, or a reason
why not. The one decoding path of wf: extraction, scratch training, predict and serve all call
:func:`load_image` or :func:`decode_image`.

Pillow does the work: JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale when the target is that
much smaller, EXIF orientation is applied, and every mode (grayscale, palette, RGBA, CMYK,
16-bit) becomes 8-bit RGB. Anything that is not a usable image raises :class:`ImageRejected`
with a short reason code, so the caller can quarantine it and go on.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, ImageOps, UnidentifiedImageError

from storage.filesystem import first_line, read_bytes

# Names that operating systems and tools drop into folders; never images, never rejects.
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", "icon\r"})

# Pillow's own limit (Image.MAX_IMAGE_PIXELS, about 89.5 megapixels) is our default. Pillow's
# check is switched off so that ours, which refuses from the limit itself, is the only one:
# --max-pixels may then raise the limit as well as lower it.
DEFAULT_MAX_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = None

REASONS = {
    "empty": "the file has zero bytes",
    "not_an_image": "Pillow does not recognise the file as an image",
    "corrupt": "the image data is truncated or corrupt",
    "too_large": "the image is over the decompression-bomb pixel limit",
    "unreadable": "the file could not be read",
    "changed": "the file changed between planning and extraction; re-run to pick it up",
}


class ImageRejected(Exception):
    """An image that cannot be used; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def is_ignored_file(name: str) -> bool:
    """Hidden files (``.DS_Store``, ``._foo.jpg``) and system files (``Thumbs.db``)."""
    return name.startswith(".") or name.lower() in IGNORED_NAMES


def read_image_bytes(filesystem: pafs.FileSystem, path: str) -> bytes:
    """The file's bytes, or :class:`ImageRejected` ``unreadable`` with the OS's reason."""
    try:
        return read_bytes(filesystem, path)
    except OSError as error:
        reason = error.strerror or first_line(error)
        raise ImageRejected("unreadable", f"{type(error).__name__}: {reason}") from error


def load_image(
    filesystem: pafs.FileSystem, path: str, size: tuple[int, int],
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:  # fmt: skip
    """Read and decode the image at ``path``: ``uint8`` ``(height, width, 3)`` of ``size``."""
    return decode_image(read_image_bytes(filesystem, path), size, max_pixels)


def decode_image(
    data: bytes, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode ``data`` into a ``uint8`` array of shape ``(height, width, 3)`` equal to ``size``.

    The image is resized without keeping its aspect ratio, as Keras's
    ``image_dataset_from_directory`` does, with Pillow's antialiasing bilinear filter.
    """
    if not data:
        raise ImageRejected("empty", REASONS["empty"])
    height, width = size
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise ImageRejected(
                "too_large", f"{image.width}x{image.height} pixels is over the limit {max_pixels}"
            )
        if image.format == "JPEG":
            # Draft keeps both sides >= the request; orientation may swap them, so ask for
            # the larger side in both directions.
            side = max(height, width)
            image.draft("RGB", (side, side))
        image.load()
        image = to_rgb(ImageOps.exif_transpose(image))
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)
    except ImageRejected:
        raise
    except UnidentifiedImageError as error:
        raise ImageRejected("not_an_image", REASONS["not_an_image"]) from error
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError,
            KeyError, ZeroDivisionError, MemoryError, OverflowError) as error:  # fmt: skip
        # Pillow's plugins raise all of these on crafted files (the fuzz test finds them).
        raise ImageRejected("corrupt", f"{type(error).__name__}: {error}"[:300]) from error


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode; transparent pixels are laid on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "F" and values.max(initial=0) > 255:
            values = values / 257.0  # 16-bit range onto 8-bit
        grey = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
