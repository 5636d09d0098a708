"""The images an int8 backbone is calibrated on: a fixed, seeded sample of the dataset's own
training images (or of a folder the user names), decoded as extraction decodes them."""

from __future__ import annotations

import contextlib
import heapq
from collections.abc import Callable

import numpy as np

from storage.errors import DatasetError
from storage.hashing import stable_unit_interval
from tasks.backbones import Backbone, ResolvedWeights
from tasks.backbones.runtime import PreparedBackbone, prepare_backbone
from tasks.images import ImageRejected, load_image
from workflows.datasets import DatasetSpec, list_tree
from workflows.extract.settings import ExtractSettings


def calibration_images(spec: DatasetSpec, settings: ExtractSettings) -> np.ndarray:
    """Up to ``calibration_images`` usable images, the same ones on every run: the training
    images ordered by a hash of their path salted with the run seed (or a folder's images)."""
    salt = f"wf-calibration-{settings.seed}"
    if settings.calibration:
        tree = list_tree(settings.calibration)
        candidates = [(tree.location.filesystem, e.path, "/".join(e.parts)) for e in tree.files]
        candidates.sort(key=lambda c: stable_unit_interval(c[2], salt))
    else:  # the first by hash of every shard's training images, a shard read at a time
        candidates = _first_by_hash(spec, salt, max(4 * settings.calibration_images, 64))
    images = []
    for n, (filesystem, path, _) in enumerate(candidates):
        with contextlib.suppress(ImageRejected):
            images.append(load_image(filesystem, path, settings.image_size, settings.max_pixels))
        if len(images) == settings.calibration_images:
            break
        if n == len(candidates) - 1 and not settings.calibration:  # more were rejected: go on
            more = _first_by_hash(spec, salt, 4 * len(candidates))
            candidates.extend(more[len(candidates) :])
    if not images:
        raise DatasetError(f"{spec.name}: no usable image to calibrate the int8 backbone on")
    return np.stack(images)


def _first_by_hash(spec: DatasetSpec, salt: str, count: int) -> list[tuple]:
    """The ``count`` training images of ``spec`` first in order of a hash of their path salted
    with ``salt``, as ``(filesystem, path, relative path)``."""
    keyed = []
    for shard in range(spec.planned.shards):
        for item in spec.shard("train", shard).load():
            keyed.append((stable_unit_interval(item.relative_path, salt), item.relative_path,
                          item.path))  # fmt: skip
        keyed = heapq.nsmallest(count, keyed)
    return [(spec.source, path, relative) for _, relative, path in keyed]


def backbone_preparer(
    settings: ExtractSettings, backbone: Backbone, weights: ResolvedWeights
) -> Callable[[DatasetSpec], PreparedBackbone]:
    """``prepare(spec)``: the converted backbone a dataset is extracted with; one for every
    dataset with a float runtime, one per dataset's calibration set with ``litert-int8``."""
    made: dict[str, PreparedBackbone] = {}

    def prepare(spec: DatasetSpec) -> PreparedBackbone:
        calibration = None
        if settings.runtime == "litert-int8":
            calibration = calibration_images(spec, settings)
        key = "" if calibration is None else str(hash(calibration.tobytes()))
        if key not in made:
            made[key] = prepare_backbone(backbone, weights, settings.image_size,
                                         settings.selected_taps, settings.runtime,
                                         settings.cache_dir, calibration)  # fmt: skip
        return made[key]

    return prepare
