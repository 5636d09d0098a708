"""Decoding fuzzed files: every one is an image of the asked size or a reject, never a crash."""

import numpy as np

from tasks.images import ImageRejected, decode_image
from tests.corpus import fuzzed_images


def test_500_fuzzed_files_decode_or_are_rejected():
    outcomes = {"decoded": 0, "rejected": 0}
    reasons = set()
    for name, data in fuzzed_images(500, seed=0):
        try:
            pixels = decode_image(data, (24, 24))
        except ImageRejected as rejected:
            outcomes["rejected"] += 1
            reasons.add(rejected.reason)
            assert rejected.detail, name
            continue
        assert pixels.shape == (24, 24, 3) and pixels.dtype == np.uint8, name
        outcomes["decoded"] += 1
    # Both outcomes occur: truncation mostly rejects, a flipped bit in pixel data often decodes.
    assert outcomes["decoded"] > 20 and outcomes["rejected"] > 100, outcomes
    assert reasons <= {"corrupt", "not_an_image", "too_large"}
