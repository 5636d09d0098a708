import hashlib
import subprocess
import sys

import numpy as np
import pytest

from tasks.augment import AugmentPolicy, augment_image, copy_seed


def _image() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)


def _digest(image, copy) -> str:
    out = augment_image(image, AugmentPolicy(), copy_seed("abc", copy, 7))
    return hashlib.sha256(out.tobytes()).hexdigest()


def test_augmentation_is_reproducible_across_processes():
    here = [_digest(_image(), copy) for copy in (1, 2, 3)]
    code = (
        "from tests.tasks.test_augment import _digest, _image;"
        "print(','.join(_digest(_image(), c) for c in (1, 2, 3)))"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert there.stdout.strip().split(",") == here
    assert len(set(here)) == 3  # copies differ from each other


def test_seed_depends_on_image_copy_and_run_seed():
    seeds = {copy_seed("a", 1, 0), copy_seed("b", 1, 0), copy_seed("a", 2, 0), copy_seed("a", 1, 1)}
    assert len(seeds) == 4


def test_augmented_copy_keeps_shape_and_changes_pixels():
    image = _image()
    out = augment_image(image, AugmentPolicy(), 3)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out, image)


def test_identity_policy_returns_the_image():
    identity = AugmentPolicy(0, 0, 0, 0, 0, horizontal_flip=False)
    np.testing.assert_array_equal(augment_image(_image(), identity, 5), _image())


def test_nearest_fill_has_no_black_corners():
    grey = np.full((32, 32, 3), 128, np.uint8)
    out = augment_image(grey, AugmentPolicy(rotation_degrees=45, zoom=0.0), 11)
    assert (out == 128).all()


def test_bad_policy_is_refused():
    with pytest.raises(ValueError):
        AugmentPolicy(fill_mode="smear")
    with pytest.raises(ValueError):
        AugmentPolicy(zoom=1.5)
