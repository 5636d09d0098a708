"""Shared fixtures: generated image datasets, a converted-backbone cache, a local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """``../shared/datasets``; tests that need it skip where it is absent."""
    if not (SHARED_DATASETS / "cats_vs_dogs").is_dir():
        pytest.skip("../shared/datasets is not here")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One backbone cache for the whole run, so each conversion happens once."""
    return str(tmp_path_factory.mktemp("wf-cache"))


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster shared by the tests that run pipelines in-process, started the
    way the CLI starts one (its workers get wf's environment variables)."""
    from workflows.cluster import ray_cluster
    from workflows.settings import ClusterSettings

    with ray_cluster(ClusterSettings(num_cpus=2)):
        yield


def make_dataset(root: Path, classes: tuple[str, ...] = ("circles", "squares"), per_class: int = 12,
                 size: int = 48, seed: int = 0) -> Path:  # fmt: skip
    from workflows.cli.demo import generate_shapes_dataset

    generate_shapes_dataset(str(root), per_class, size=size, seed=seed, classes=classes)
    return root


def make_colour_dataset(root: Path, per_class: int = 24, size: int = 64, seed: int = 0) -> Path:
    """Two classes told apart by colour: a task even a small convnet learns from a few images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, base in (("blue", (40, 60, 200)), ("red", (200, 50, 40))):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = np.clip(np.array(base) + rng.normal(0, 40, (size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{label}_{index:03d}.jpg")
    return root
