"""Decoding one image file into an RGB array of the backbone's input size, or a reason why not.

Pillow does the work: JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale when the target is that
much smaller, EXIF orientation is applied, and every mode (grayscale, palette, RGBA, CMYK,
16-bit) becomes 8-bit RGB. Anything that is not a usable image raises :class:`ImageRejected`
with a short reason code, so the caller can quarantine it and go on.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Names that operating systems and tools drop into folders; never images, never rejects.
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", "icon\r"})

# Pillow's own limit (Image.MAX_IMAGE_PIXELS, about 89.5 megapixels): above it Pillow only
# warns, and at twice it raises. We refuse from the limit itself.
DEFAULT_MAX_PIXELS = 89_478_485

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
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            pixels = image.width * image.height
            if pixels > max_pixels:
                raise ImageRejected(
                    "too_large",
                    f"{image.width}x{image.height} pixels is over the limit {max_pixels}",
                )
            if image.format == "JPEG":
                # Draft keeps both sides >= the request; orientation may swap them, so ask for
                # the larger side in both directions.
                side = max(height, width)
                image.draft("RGB", (side, side))
            image.load()
            image = ImageOps.exif_transpose(image)
            image = to_rgb(image)
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected("too_large", str(error)) from error
    except UnidentifiedImageError as error:
        raise ImageRejected("not_an_image", REASONS["not_an_image"]) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageRejected("corrupt", f"{type(error).__name__}: {error}") from error


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
