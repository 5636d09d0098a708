"""A small deterministic image dataset, so the main job runs on a fresh machine with no data.

Three classes of coloured shapes (circles, squares, triangles) on noisy backgrounds, drawn by
Pillow from a seeded generator: the same seed gives the same JPEG bytes on every machine.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from workflows.settings import ClusterSettings, setting

SHAPES = ("circles", "squares", "triangles")


# The demo's classes also differ in colour (a hue family each), so the small convnet from
# scratch learns them within the demo's few hundred steps, as the other methods do; the tests'
# shapes (``coloured=False``) differ in shape only, on any colour.
CLASS_HUES = {"circles": 0.0, "squares": 1 / 3, "triangles": 2 / 3}


def _coloured(shape: str, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, ...]]:
    """A grey background and a saturated shape of its class's hue."""
    import colorsys

    hue = (CLASS_HUES.get(shape, rng.uniform()) + rng.uniform(-0.06, 0.06)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
    return np.full(3, rng.integers(40, 200)), tuple(int(255 * c) for c in rgb)


def draw_shape(
    shape: str, rng: np.random.Generator, size: int, coloured: bool = False
) -> Image.Image:
    if coloured:
        background, colour = _coloured(shape, rng)
    else:
        background = rng.integers(0, 256, size=3)
    noise = rng.normal(0, 18, size=(size, size, 3))
    pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.18, 0.35) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    if not coloured:
        colour = tuple(int(c) for c in (255 - background + rng.integers(-40, 40, size=3)) % 256)
    if shape == "circles":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif shape == "squares":
        angle = rng.uniform(0, np.pi / 2)
        corners = [
            (
                cx + radius * np.cos(angle + k * np.pi / 2),
                cy + radius * np.sin(angle + k * np.pi / 2),
            )
            for k in range(4)
        ]
        draw.polygon(corners, fill=colour)
    else:
        angle = rng.uniform(0, 2 * np.pi)
        corners = [
            (
                cx + radius * np.cos(angle + k * 2 * np.pi / 3),
                cy + radius * np.sin(angle + k * 2 * np.pi / 3),
            )
            for k in range(3)
        ]
        draw.polygon(corners, fill=colour)
    return image


def generate_shapes_dataset(
    root: str, images_per_class: int = 40, size: int = 96, seed: int = 0,
    classes: tuple[str, ...] = SHAPES, coloured: bool = False,
) -> str:  # fmt: skip
    """Write ``root/<class>/<class>_NNNN.jpg`` and return ``root``; existing files are kept.
    ``coloured``: each class a hue of its own too (the demo's)."""
    rng = np.random.default_rng(seed)
    for shape in classes:
        folder = os.path.join(root, shape)
        os.makedirs(folder, exist_ok=True)
        for index in range(images_per_class):
            image = draw_shape(shape, rng, size, coloured)
            path = os.path.join(folder, f"{shape}_{index:04d}.jpg")
            if not os.path.exists(path):
                image.save(path, quality=90)
    return root


@dataclass(frozen=True)
class DemoSettings:
    folder: str = setting("wf-demo", "Where its data, store and runs go")
    images_per_class: int = setting(40, "Generated images per class")
    shards: int = setting(4, "Shards per split")
    weights: str = setting("imagenet", "imagenet or none")
    epochs: int = setting(8, "Epochs of every method")
    cache_dir: str | None = None  # the extract's default
    cluster: ClusterSettings = field(default_factory=ClusterSettings)


@dataclass(frozen=True)
class DemoResult:
    data: str
    runs: str
    reports: list[Any]
    results: list[Any]


def run_demo(
    settings: DemoSettings,
    extract: Callable[[Any], list[Any]] | None = None,
    train: Callable[[Any], list[Any]] | None = None,
) -> DemoResult:
    """Draw the shapes dataset, extract it and train every default method on it, on one Ray
    cluster. ``extract`` and ``train`` run the two pipelines (by default, plainly; the CLI
    passes them with their progress displays)."""
    from workflows.cluster import ray_cluster
    from workflows.extract.run import run_extract
    from workflows.extract.settings import DatasetSource, ExtractSettings
    from workflows.train.run import run_train_all
    from workflows.train.settings import TrainSettings, recipes_from_options

    extract, train = extract or run_extract, train or run_train_all
    data = generate_shapes_dataset(
        os.path.join(settings.folder, "data", "shapes"), settings.images_per_class, coloured=True
    )
    extra = {"cache_dir": settings.cache_dir} if settings.cache_dir else {}
    extract_settings = ExtractSettings(
        datasets=(DatasetSource(data),), store=os.path.join(settings.folder, "store"),
        shards=settings.shards, weights=settings.weights, cluster=settings.cluster, **extra,
    )  # fmt: skip
    train_settings = TrainSettings(
        store=extract_settings.store, runs=os.path.join(settings.folder, "runs"),
        recipes=recipes_from_options(settings.epochs, None, {}, {}), cluster=settings.cluster,
    )  # fmt: skip
    options = replace(train_settings.options, scratch_image_size=96)
    train_settings = replace(train_settings, options=options)
    with ray_cluster(settings.cluster):  # one cluster for both halves
        reports = extract(extract_settings)
        results = train(train_settings)
    return DemoResult(data, train_settings.runs, reports, results)


def run_demo_with_progress(settings: DemoSettings) -> DemoResult:
    """:func:`run_demo` with each pipeline's progress display, one after the other."""
    from workflows.cli.console import extract_progress, train_progress
    from workflows.extract.run import run_extract
    from workflows.train.run import run_train_all

    def extract(extract_settings: Any) -> list[Any]:
        with extract_progress() as progress:
            return run_extract(extract_settings, progress)

    def train(train_settings: Any) -> list[Any]:
        with train_progress() as progress:
            return run_train_all(train_settings, progress)

    return run_demo(settings, extract, train)
