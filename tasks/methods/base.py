"""What every training method is, and the snapshot of its stores a job carries to its workers.

A method says which stored tap it reads (or that it reads images), what it trains, how that
starts, the complete model it saves, which job it depends on, and its default recipe (the
Keras blog's settings). One module per method; :mod:`tasks.methods` lists them. Nothing else
compares method names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from storage.errors import SettingsError
from storage.feature_store import tap_column
from storage.runs import RunsLayout, job_key, job_run_name
from tasks.augment import AugmentPolicy
from tasks.backbones import ResolvedWeights, get_backbone

OPTIMIZERS = ("rmsprop", "sgd", "adam")


@dataclass(frozen=True)
class Recipe:
    """How a method trains: epochs, batch size per worker and the optimiser."""

    epochs: int = 50
    batch_size: int = 16
    optimizer: str = "rmsprop"
    learning_rate: float = 1e-3
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise SettingsError("epochs, batch size and learning rate must be positive")
        if self.optimizer not in OPTIMIZERS:
            raise SettingsError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}: {self.optimizer}"
            )

    def optimizer_for(self, keras_module: Any) -> Any:
        if self.optimizer == "sgd":
            return keras_module.optimizers.SGD(self.learning_rate, momentum=self.momentum)
        if self.optimizer == "adam":
            return keras_module.optimizers.Adam(self.learning_rate)
        return keras_module.optimizers.RMSprop(self.learning_rate)


@dataclass(frozen=True)
class StoreSnapshot:
    """One feature store a job reads, as its manifest records it."""

    backbone: str
    input_size: tuple[int, int]
    taps: dict[str, tuple[int, ...]]
    copies: int  # stored rows per training image (the original and its augmented copies)
    files: dict[str, tuple[str, ...]]  # split -> committed part files, as the filesystem names them
    rows: dict[str, int]  # split -> stored rows (every copy)
    images: dict[str, int]  # split -> usable images (copy 0 rows)
    manifest_id: str
    weights_source: str
    weights_sha256: str
    labelled_id: str = ""  # the manifest's labelled_id: what a job trained on
    preprocessing: str = ""  # an ONNX backbone's sidecar fingerprint at extraction


@dataclass(frozen=True)
class TrainOptions:
    """How every job of a run trains, whatever its method."""

    workers: int = 1
    threads: int = 1
    use_gpu: bool = False
    early_stopping_patience: int | None = None
    keep_best: bool = False
    epoch_copies: str = "all"  # or "one": each training image once per epoch, copies in turn
    seed: int = 0
    scratch_image_size: int = 150
    policy: AugmentPolicy = field(default_factory=AugmentPolicy)
    max_failures: int = 2
    abstain_rate: float = 0.05  # of held-out in-distribution images the model declines


@dataclass(frozen=True)
class JobContext:
    """Everything one (dataset, method) job needs, frozen, built once by the workflow."""

    dataset: str
    method: str
    classes: tuple[str, ...]
    dataset_root: str  # where the images are (a path or a URI), for methods that read them
    stores: tuple[StoreSnapshot, ...]  # the first is the job's own backbone
    store_filesystem: Any  # pyarrow FileSystem of the stores
    runs: RunsLayout
    recipe: Recipe
    options: TrainOptions
    # What cross-validation found (tasks.cross_validation.CrossValidated), when it ran: the job
    # writes it to metrics.json and saves its model calibrated by its temperature.
    cv: Any = None

    @property
    def key(self) -> str:
        return job_key(self.dataset, self.method)

    @property
    def run_name(self) -> str:
        return job_run_name(self.dataset, self.method)

    @property
    def store(self) -> StoreSnapshot:
        return self.stores[0]

    def has_split(self, split: str) -> bool:
        return bool(self.store.files.get(split))


@dataclass(frozen=True)
class MethodOption:
    """An option that one method reads: its :class:`TrainOptions` field (``--field-name`` on
    the command line), what it does, and the least value it takes."""

    field: str
    help: str
    minimum: int | None = None

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


class Method(ABC):
    """A training method. Subclasses set the attributes and build the models."""

    name: str
    summary: str
    recipe: Recipe
    taps: tuple[str, ...] = ()  # stored taps read from each store; empty: reads images
    depends_on: str | None = None  # a method whose trained weights this one starts from
    all_backbones: bool = False  # reads every backbone stored for the dataset
    augments_live: bool = False  # augments images as it reads them (reads copy 0 only)
    output_name: str = ""  # its last Dense layer (logits to probabilities): a temperature divides
    embedding_layer: str = ""  # the layer whose input is the embedding abstention measures
    closed_form: bool = False  # its trainable model is set in one step (fit_closed_form), no epochs
    options: tuple[MethodOption, ...] = ()  # the TrainOptions fields only this method reads

    def check_options(self, options: TrainOptions) -> None:
        """Refuse, in one line, a value of one of its own options that it cannot train with."""
        for option in self.options:
            value = getattr(options, option.field)
            if option.minimum is not None and value < option.minimum:
                raise SettingsError(f"{option.flag} must be at least {option.minimum} "
                                    f"({self.name}), not {value}")  # fmt: skip

    @property
    def fits_on_rows(self) -> bool:
        """Its model trains from nothing on stored rows: cross-validated by small fits."""
        return type(self).build_on_rows is not Method.build_on_rows

    def columns(self) -> list[str]:
        """The store columns a worker reads for this method, beside labels and copies."""
        return [tap_column(tap) for tap in self.taps] or ["path"]

    @abstractmethod
    def features(self, context: JobContext, tables: list[pa.Table]) -> np.ndarray:
        """The model's inputs for these rows (one table per store of the context, aligned)."""

    @abstractmethod
    def build_trainable(self, keras_module: Any, context: JobContext) -> Any:
        """The model the job trains, with ``keras_module`` (tf-keras on workers, Keras 3 after)."""

    def build_on_rows(
        self, keras_module: Any, feature_shape: tuple[int, ...], num_classes: int
    ) -> Any:
        """The model the method trains on stored rows of ``feature_shape``, with no job around
        it: what :mod:`tasks.training.small_fits` fits (k-fold folds, learning-curve points).
        Only methods whose model starts from nothing on stored rows have one."""
        raise SettingsError(f"{self.name} has no small fits: it trains on images or from a job")

    def fit_closed_form(
        self, x: np.ndarray, y: np.ndarray, num_classes: int
    ) -> dict[str, list[np.ndarray]]:
        """The trainable model's weights by layer name, computed from rows ``x`` and labels
        ``y`` in one step (methods with ``closed_form``)."""
        raise SettingsError(f"{self.name} trains by gradient, not in closed form")

    def predict_closed_form(
        self, weights: dict[str, list[np.ndarray]], x: np.ndarray
    ) -> np.ndarray:
        """The trainable model's raw outputs for rows ``x``, in numpy (methods with
        ``closed_form``): what its small fits predict without TensorFlow."""
        raise SettingsError(f"{self.name} trains by gradient, not in closed form")

    def initial_weights(
        self, context: JobContext, weights: dict[str, ResolvedWeights]
    ) -> dict[str, list[np.ndarray]] | None:
        """Weights by layer name to start from (None: the seeded initialisation)."""
        return None

    @abstractmethod
    def complete_model(
        self, context: JobContext, trained: dict[str, list[np.ndarray]],
        weights: dict[str, ResolvedWeights],
    ) -> Any:  # fmt: skip
        """The Keras 3 model users get: RGB pixels in [0, 255] in, class probabilities out."""


_BASES: dict[tuple, Any] = {}
_BASES_KEPT = 4


def pretrained_base(
    store: StoreSnapshot, weights: dict[str, ResolvedWeights], fresh: bool = False
) -> Any:
    """The Keras 3 model of ``store``'s backbone with its weights, at the store's input size.

    Built once per process for each (backbone, size, weights) and shared by the jobs of a
    long-lived training worker that only read it (building Lite0 takes about 2 s, most of a
    bottleneck job's cost beyond its epochs); ``fresh`` builds one of the caller's own, for a
    caller that changes its weights (finetune's saved model)."""
    resolved = weights[store.backbone]
    if fresh:
        return get_backbone(store.backbone).build(store.input_size, resolved)
    key = (store.backbone, tuple(store.input_size), resolved.source, resolved.sha256)
    if key not in _BASES:
        while len(_BASES) >= _BASES_KEPT:
            _BASES.pop(next(iter(_BASES)))
        _BASES[key] = get_backbone(store.backbone).build(store.input_size, resolved)
    return _BASES[key]


def stack_tap(column: pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    """A stored tap column as float32 ``(rows, *shape)``."""
    from storage.feature_store import tap_to_numpy

    return tap_to_numpy(column, shape).astype(np.float32, copy=False)
