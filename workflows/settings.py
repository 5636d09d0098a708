"""Settings, built once from CLI options or a TOML config file and passed down, frozen.

No other module reads the environment or global configuration.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from typing import Any

from storage.errors import SettingsError
from storage.feature_store import FEATURE_DTYPES
from tasks.augment import AugmentPolicy
from tasks.backbones import BACKBONES, DEFAULT_BACKBONE
from tasks.backbones.runtime import DEFAULT_RUNTIME, RUNTIMES
from tasks.images import DEFAULT_MAX_PIXELS


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "wf")


# TensorFlow turns its oneDNN CPU kernels on by default only on some Intel CPUs; on this
# project's AMD machines they make the fine-tune's train step about 1.2x faster
# (benchmarks/finetune_speed.py). Set for the CLI's process and every Ray worker; a value the
# user set wins.
TENSORFLOW_ENV = {"TF_ENABLE_ONEDNN_OPTS": "1"}


# Ray Train's controller collects each worker's reports when it polls the workers, every 2 s
# by default, and a worker's next report waits until the last one was collected: with short
# epochs (a dense top on a few thousand rows) every epoch took at least 2 s. Polling every
# 0.2 s removes that floor; a poll is one cheap actor call per worker.
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def _user_values_win(defaults: dict[str, str]) -> dict[str, str]:
    """``defaults`` under the values this process's environment already has."""
    return {name: os.environ.get(name, value) for name, value in defaults.items()}


def tensorflow_env() -> dict[str, str]:
    """:data:`TENSORFLOW_ENV`, a value the user set winning."""
    return _user_values_win(TENSORFLOW_ENV)


def worker_env() -> dict[str, str]:
    """Every Ray worker's environment variables (:data:`TENSORFLOW_ENV`, :data:`RAY_TRAIN_ENV`),
    a value the user set winning."""
    return _user_values_win({**TENSORFLOW_ENV, **RAY_TRAIN_ENV})


@dataclass(frozen=True)
class ClusterSettings:
    """``address=None`` starts a local Ray cluster with ``num_cpus`` (all cores when None)."""

    address: str | None = None
    num_cpus: int | None = None


@dataclass(frozen=True)
class DatasetSource:
    """A dataset folder, with an optional name and validation fraction of its own."""

    path: str
    name: str | None = None
    validation_fraction: float | None = None


@dataclass(frozen=True)
class ExtractSettings:
    datasets: tuple[DatasetSource, ...]
    store: str = "store"
    shards: int = 8
    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"
    input_size: int | None = None
    taps: tuple[str, ...] | None = None
    dtype: str = "float16"
    augment: int = 2
    policy: AugmentPolicy = field(default_factory=AugmentPolicy)
    seed: int = 0
    validation_fraction: float = 0.2
    runtime: str = DEFAULT_RUNTIME
    batch_size: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS
    threads_per_task: int = 1
    cache_dir: str = field(default_factory=default_cache_dir)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    def __post_init__(self) -> None:
        if not self.datasets:
            raise SettingsError("no dataset given: pass DATA_ROOT... or --config FILE")
        if not 1 <= self.shards <= 99_999:
            raise SettingsError(f"--shards must be between 1 and 99999, got {self.shards}")
        if self.backbone not in BACKBONES:
            raise SettingsError(
                f"unknown backbone {self.backbone!r}; choose one of {', '.join(sorted(BACKBONES))}"
            )
        if self.dtype not in FEATURE_DTYPES:
            raise SettingsError(f"--dtype must be one of {', '.join(FEATURE_DTYPES)}: {self.dtype}")
        if self.runtime not in RUNTIMES:
            raise SettingsError(f"--runtime must be one of {', '.join(RUNTIMES)}: {self.runtime}")
        if self.augment < 0:
            raise SettingsError(f"--augment must be >= 0, got {self.augment}")
        if not 0 <= self.validation_fraction < 1:
            raise SettingsError("--validation-fraction must be in [0, 1)")
        for source in self.datasets:
            fraction = source.validation_fraction
            if fraction is not None and not 0 <= fraction < 1:
                raise SettingsError(f"validation_fraction of {source.path} must be in [0, 1)")
        if self.batch_size < 1 or self.threads_per_task < 1 or self.max_pixels < 1:
            raise SettingsError("--batch-size, --threads and --max-pixels must be >= 1")
        if self.input_size is not None and self.input_size < 32:
            raise SettingsError(f"--image-size must be at least 32, got {self.input_size}")

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.input_size or BACKBONES[self.backbone].default_input_size
        return (size, size)

    @property
    def selected_taps(self) -> tuple[str, ...]:
        return self.taps or BACKBONES[self.backbone].default_taps


_TOP_LEVEL_KEYS = {f.name for f in fields(ExtractSettings)} - {"datasets", "policy", "cluster"}


def load_config(path: str) -> dict[str, Any]:
    """Read a TOML config: top-level extract settings, ``[augment_policy]`` and ``[[datasets]]``.

    Returns keyword arguments for :class:`ExtractSettings`; relative dataset paths are taken
    relative to the config file.
    """
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"config file {path} is not valid TOML: {error}") from None
    base = os.path.dirname(os.path.abspath(path))
    unknown = set(raw) - _TOP_LEVEL_KEYS - {"datasets", "augment_policy"}
    if unknown:
        raise SettingsError(f"unknown keys in {path}: {', '.join(sorted(unknown))}")
    settings: dict[str, Any] = {key: raw[key] for key in _TOP_LEVEL_KEYS if key in raw}
    if "taps" in settings:
        settings["taps"] = tuple(settings["taps"])
    datasets = []
    for entry in raw.get("datasets", []):
        if "path" not in entry or set(entry) - {"path", "name", "validation_fraction"}:
            raise SettingsError(
                f"each [[datasets]] in {path} needs 'path', "
                "and may have 'name' and 'validation_fraction'"
            )
        datasets.append(
            DatasetSource(
                os.path.join(base, os.path.expanduser(entry["path"])),
                entry.get("name"),
                entry.get("validation_fraction"),
            )
        )
    settings["datasets"] = tuple(datasets)
    if "augment_policy" in raw:
        try:
            settings["policy"] = AugmentPolicy(**raw["augment_policy"])
        except (TypeError, ValueError) as error:
            raise SettingsError(f"[augment_policy] in {path}: {error}") from None
    return settings


# The Keras blog's defaults: 50 epochs, batch 16; RMSprop for the top and the small convnet,
# SGD 1e-4 with momentum 0.9 for fine-tuning.
BLOG_EPOCHS = 50
BLOG_BATCH_SIZE = 16
# What one epoch of a job on stored taps reads: "all" stored copies of every training image, or
# "one" copy of each image, the next one each epoch (the blog's epoch: every image once, freshly
# augmented).
EPOCH_COPIES = ("all", "one")


@dataclass(frozen=True)
class MethodSettings:
    epochs: int = BLOG_EPOCHS
    batch_size: int = BLOG_BATCH_SIZE
    optimizer: str = "rmsprop"
    learning_rate: float = 1e-3
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise SettingsError("epochs, batch size and learning rate must be positive")
        if self.optimizer not in ("rmsprop", "sgd", "adam"):
            raise SettingsError(f"optimizer must be rmsprop, sgd or adam: {self.optimizer}")


def default_methods(**epochs: int) -> dict[str, MethodSettings]:
    """The blog's settings of each method, the only place they are written down; keyword
    arguments change a method's epochs: ``default_methods(finetune=8)``."""
    methods = {
        "bottleneck": MethodSettings(),
        "finetune": MethodSettings(optimizer="sgd", learning_rate=1e-4, momentum=0.9),
        "scratch": MethodSettings(),
    }
    return {name: replace(m, epochs=epochs.get(name, m.epochs)) for name, m in methods.items()}


@dataclass(frozen=True)
class TrainSettings:
    store: str = "store"
    runs: str = "runs"
    datasets: tuple[str, ...] | None = None
    methods: tuple[str, ...] = ("bottleneck", "finetune", "scratch")
    backbone: str | None = None
    method_settings: dict[str, MethodSettings] = field(default_factory=default_methods)
    workers: int = 1
    threads_per_worker: int = 1
    use_gpu: bool = False
    early_stopping_patience: int | None = None
    keep_best: bool = False
    epoch_copies: str = "all"
    seed: int = 0
    scratch_image_size: int = 150
    max_concurrent_jobs: int | None = None
    max_failures: int = 0
    force: bool = False
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    def __post_init__(self) -> None:
        unknown = set(self.methods) - {"bottleneck", "finetune", "scratch"}
        if unknown or not self.methods:
            raise SettingsError(
                f"--methods must name bottleneck, finetune or scratch: {', '.join(sorted(unknown))}"
            )
        if self.workers < 1 or self.threads_per_worker < 1:
            raise SettingsError("--workers and --threads must be >= 1")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise SettingsError("--early-stopping must be >= 1 epochs")
        if self.epoch_copies not in EPOCH_COPIES:
            raise SettingsError(
                f"--epoch-copies must be {' or '.join(EPOCH_COPIES)}: {self.epoch_copies}"
            )
        if self.scratch_image_size < 32:
            raise SettingsError("--scratch-image-size must be at least 32")
