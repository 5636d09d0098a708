"""The Keras blog's augmentation as a documented, seeded policy.

The blog (Chollet, 2016) used ``ImageDataGenerator(rotation_range=40, width_shift_range=0.2,
height_shift_range=0.2, shear_range=0.2, zoom_range=0.2, horizontal_flip=True,
fill_mode='nearest')``. :func:`augment_image` draws the same random parameters and composes the
same affine matrix as that generator (rotation, then shift, shear and zoom about the image
centre, bilinear sampling, nearest fill, then an optional horizontal flip), with SciPy doing the
resampling. Keras 1, which the blog used, read ``shear_range`` in radians; so does this policy.

Each augmented copy is seeded from the image's content id, the copy index and the run seed, so
it is the same bit for bit on any worker, in any order. Copy 0 is always the original image.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class AugmentPolicy:
    rotation_degrees: float = 40.0
    width_shift: float = 0.2
    height_shift: float = 0.2
    shear_radians: float = 0.2
    zoom: float = 0.2
    horizontal_flip: bool = True
    fill_mode: str = "nearest"

    def __post_init__(self) -> None:
        if self.fill_mode not in ("nearest", "reflect", "wrap", "constant"):
            raise ValueError(
                f"fill_mode must be nearest, reflect, wrap or constant: {self.fill_mode}"
            )
        for name in ("rotation_degrees", "width_shift", "height_shift", "shear_radians", "zoom"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.zoom >= 1:
            raise ValueError("zoom must be < 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def copy_seed(image_id: str, copy_index: int, run_seed: int) -> int:
    """The 64-bit seed of one augmented copy; independent of worker, order and process."""
    key = f"{image_id}:{copy_index}:{run_seed}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def augment_image(image: np.ndarray, policy: AugmentPolicy, seed: int) -> np.ndarray:
    """A randomly transformed copy of ``image`` (``uint8``, ``(h, w, 3)``), reproducible by seed."""
    rng = np.random.default_rng(seed)
    height, width = image.shape[:2]
    theta = math.radians(rng.uniform(-policy.rotation_degrees, policy.rotation_degrees))
    shift_rows = rng.uniform(-policy.height_shift, policy.height_shift) * height
    shift_cols = rng.uniform(-policy.width_shift, policy.width_shift) * width
    shear = rng.uniform(-policy.shear_radians, policy.shear_radians)
    zoom_rows, zoom_cols = rng.uniform(1 - policy.zoom, 1 + policy.zoom, size=2)
    flip = policy.horizontal_flip and rng.random() < 0.5

    # The generator's matrix in (row, col) coordinates: rotation @ shift @ shear @ zoom.
    rotation = np.array(
        [[math.cos(theta), -math.sin(theta), 0], [math.sin(theta), math.cos(theta), 0], [0, 0, 1]]
    )
    shift = np.array([[1, 0, shift_rows], [0, 1, shift_cols], [0, 0, 1]])
    shearing = np.array([[1, -math.sin(shear), 0], [0, math.cos(shear), 0], [0, 0, 1]])
    zooming = np.array([[zoom_rows, 0, 0], [0, zoom_cols, 0], [0, 0, 1]])
    matrix = rotation @ shift @ shearing @ zooming
    centre_rows, centre_cols = height / 2 - 0.5, width / 2 - 0.5
    to_centre = np.array([[1, 0, centre_rows], [0, 1, centre_cols], [0, 0, 1]])
    from_centre = np.array([[1, 0, -centre_rows], [0, 1, -centre_cols], [0, 0, 1]])
    matrix = to_centre @ matrix @ from_centre
    # Keras swaps to (x, y) order because numpy indexes (row, col); do the same.
    matrix[:, [0, 1]] = matrix[:, [1, 0]]
    matrix[[0, 1]] = matrix[[1, 0]]

    from scipy import ndimage  # 0.27 s to import: only where an image is augmented

    source = image.astype(np.float32)
    channels = [
        ndimage.affine_transform(
            source[..., c], matrix[:2, :2], matrix[:2, 2], order=1, mode=policy.fill_mode
        )
        for c in range(source.shape[-1])
    ]
    out = np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)
    if flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)
