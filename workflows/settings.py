"""Settings, built once from CLI options or a TOML config file and passed down, frozen.

Every option's help text and default live on its field here; the CLI's help is generated from
them. No other module reads the environment or global configuration.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from storage.errors import SettingsError
from storage.feature_store import FEATURE_DTYPES
from tasks.augment import AugmentPolicy
from tasks.backbones import DEFAULT_BACKBONE, get_backbone
from tasks.backbones.onnx_backbone import OnnxBackbone
from tasks.backbones.runtime import DEFAULT_RUNTIME, RUNTIMES, runtime_for
from tasks.heads import SCRATCH_IMAGE_SIZE
from tasks.images import DEFAULT_MAX_PIXELS
from tasks.methods import DEFAULT_METHODS, METHODS, Recipe, TrainOptions, get_method


def setting(default: Any = MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field that carries its CLI help."""
    if "default_factory" in kwargs:
        return field(metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def option_help(cls: type, name: str, shown_default: str | None = None) -> str:
    """The help of setting ``name`` of ``cls`` with its default, for typer."""
    (spec,) = [f for f in fields(cls) if f.name == name]
    text = spec.metadata.get("help", "")
    if "(default:" in text:  # a default that is not a value says what it means itself
        return text
    default = shown_default
    if default is None:
        value = spec.default if spec.default is not MISSING else spec.default_factory()  # type: ignore[misc]
        default = ",".join(value) if isinstance(value, tuple) else str(value)
    return f"{text} (default: {default})"


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "wf")


# TensorFlow turns its oneDNN CPU kernels on by default only on some Intel CPUs; on this
# project's AMD machines they make the fine-tune's train step about 1.2x faster
# (benchmarks/finetune_speed.py). Ray Train's controller collects each worker's reports when it
# polls them, every 2 s by default, and a worker's next report waits for that: with sub-second
# epochs every epoch took 2 s. Set for the CLI's process and every Ray worker; a value the user
# set wins.
TENSORFLOW_ENV = {"TF_ENABLE_ONEDNN_OPTS": "1"}
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def _user_values_win(defaults: dict[str, str]) -> dict[str, str]:
    return {name: os.environ.get(name, value) for name, value in defaults.items()}


def tensorflow_env() -> dict[str, str]:
    """:data:`TENSORFLOW_ENV`, a value the user set winning."""
    return _user_values_win(TENSORFLOW_ENV)


def worker_env() -> dict[str, str]:
    """Every Ray worker's environment variables, a value the user set winning."""
    return _user_values_win({**TENSORFLOW_ENV, **RAY_TRAIN_ENV})


@dataclass(frozen=True)
class ClusterSettings:
    """``address=None`` starts a local Ray cluster with ``num_cpus`` (all cores when None)."""

    address: str | None = setting(None, "Ray cluster to use, or RAY_ADDRESS (default: a local one)")
    num_cpus: int | None = setting(None, "CPUs of the local Ray cluster (default: all)")
    verbose: bool = False  # Ray's and TensorFlow's own start-up lines


@dataclass(frozen=True)
class DatasetSource:
    """A dataset folder (path or URI), with an optional name and validation fraction."""

    path: str
    name: str | None = None
    validation_fraction: float | None = None


@dataclass(frozen=True)
class ExtractSettings:
    datasets: tuple[DatasetSource, ...]
    store: str = setting("store", "Feature store root: a path or a URI (s3://...)")
    shards: int = setting(8, "Shards per split, one Ray task each")
    backbone: str = setting(
        DEFAULT_BACKBONE,
        "Backbone: a name from `wf backbones`, or onnx:PATH_OR_URI (your ONNX "
        "model, with its sidecar PATH_OR_URI.json)",
    )
    weights: str = setting("imagenet", "imagenet, none (random) or a local weights file")
    input_size: int | None = setting(None, "Square input size in pixels (default: the backbone's)")
    taps: tuple[str, ...] | None = setting(
        None, "Comma-separated taps to store (default: the backbone's)"
    )
    dtype: str = setting("float16", "Feature dtype: float16 or float32")
    augment: int = setting(2, "Augmented copies per training image")
    policy: AugmentPolicy = field(default_factory=AugmentPolicy)  # [augment_policy] in a config
    seed: int = setting(0, "Run seed for augmentation")
    validation_fraction: float = setting(0.2, "Held-out share when a dataset has no split folders")
    runtime: str = setting(DEFAULT_RUNTIME, f"Backbone runtime: {', '.join(RUNTIMES)}")
    calibration: str | None = setting(
        None, "litert-int8: a folder of images to calibrate on (default: the dataset's own)"
    )
    calibration_images: int = setting(100, "litert-int8: images to calibrate on")
    batch_size: int = setting(32, "Images per batch through the backbone")
    max_pixels: int = setting(
        DEFAULT_MAX_PIXELS, "Reject images with more pixels (decompression bombs)"
    )
    threads_per_task: int = setting(1, "CPUs (and inference threads) per shard task")
    cache_dir: str = setting(help="Converted backbones cache", default_factory=default_cache_dir)
    wait: bool = setting(False, "Wait for a store another run is writing, instead of refusing")
    drop_empty_classes: bool = setting(False, "Drop a class with no usable training image (warn)")
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    def __post_init__(self) -> None:
        if not self.datasets:
            raise SettingsError("no dataset given: pass DATA_ROOT... or --config FILE")
        if not 1 <= self.shards <= 99_999:
            raise SettingsError(f"--shards must be between 1 and 99999, got {self.shards}")
        backbone = get_backbone(self.backbone)  # an unknown name or a bad ONNX file: one line
        if isinstance(backbone, OnnxBackbone):  # one spelling of the file and the runtime, so
            object.__setattr__(self, "backbone", backbone.source)  # the fingerprint is the same
            object.__setattr__(self, "runtime", runtime_for(backbone, self.runtime))
        runtime_for(backbone, self.runtime)
        if self.input_size is not None and self.input_size != backbone.default_input_size:
            backbone.check_input_size((self.input_size, self.input_size))
        if self.dtype not in FEATURE_DTYPES:
            raise SettingsError(f"--dtype must be one of {', '.join(FEATURE_DTYPES)}: {self.dtype}")
        if self.runtime not in RUNTIMES:
            raise SettingsError(f"--runtime must be one of {', '.join(RUNTIMES)}: {self.runtime}")
        if self.augment < 0:
            raise SettingsError(f"--augment must be >= 0, got {self.augment}")
        for fraction in (self.validation_fraction, *(s.validation_fraction for s in self.datasets)):
            if fraction is not None and not 0 <= fraction < 1:
                raise SettingsError(f"a validation fraction must be in [0, 1): {fraction}")
        if self.calibration_images < 1:
            raise SettingsError("--calibration-images must be >= 1")
        if self.batch_size < 1 or self.threads_per_task < 1 or self.max_pixels < 1:
            raise SettingsError("--batch-size, --threads and --max-pixels must be >= 1")
        if self.input_size is not None and self.input_size < 32:
            raise SettingsError(f"--image-size must be at least 32, got {self.input_size}")

    @property
    def backbone_name(self) -> str:
        """The store's folder for the backbone: its name (an ONNX model's sidecar name)."""
        return get_backbone(self.backbone).name

    @property
    def image_size(self) -> tuple[int, int]:
        backbone = get_backbone(self.backbone)
        if isinstance(backbone, OnnxBackbone):
            return backbone.input_size
        size = self.input_size or backbone.default_input_size
        return (size, size)

    @property
    def selected_taps(self) -> tuple[str, ...]:
        return self.taps or get_backbone(self.backbone).default_taps


# Settings that do not change a single stored number: left out of the features' fingerprint.
# Everything else is in it, a setting added later included (HF datasets' rule).
NOT_FEATURE_SETTINGS = (
    "datasets",  # the shards' own fingerprints hold their images
    "store", "shards", "cache_dir", "cluster", "wait", "drop_empty_classes",
    "validation_fraction",  # moves images between splits: the shards' fingerprints see it
    "max_pixels",  # decides rejects: in the shards' fingerprints
    "batch_size", "threads_per_task",  # how fast, not what
    "weights", "input_size", "taps",  # fingerprinted as resolved: weights' SHA-256, size, taps
    "calibration", "calibration_images",  # ... and the calibration images' fingerprint
)  # fmt: skip


ENSEMBLE_CHOICES = ("off", "beyond-noise", "always")


def default_recipes() -> dict[str, Recipe]:
    """Each method's own recipe (the Keras blog's settings for its three)."""
    return {name: method.recipe for name, method in METHODS.items()}


@dataclass(frozen=True)
class TrainSettings:
    store: str = setting("store", "Feature store root written by `wf extract`")
    runs: str = setting("runs", "Where models, metrics and plots go: a path or a URI")
    datasets: tuple[str, ...] | None = setting(
        None, "Comma-separated datasets (default: all in the store)"
    )
    methods: tuple[str, ...] = setting(
        DEFAULT_METHODS, f"Comma-separated, of: {', '.join(METHODS)}"
    )
    backbone: str | None = setting(
        None, f"Which backbone's store to train on (default: {DEFAULT_BACKBONE} if there)"
    )
    recipes: dict[str, Recipe] = field(default_factory=default_recipes)
    options: TrainOptions = field(default_factory=TrainOptions)
    max_concurrent_jobs: int | None = setting(
        None, "Jobs at once (default: CPUs / (workers x threads))"
    )
    force: bool = setting(False, "Retrain jobs that already have artifacts")
    cv: int | None = setting(
        None,
        "Cross-validation folds over train + validation for the methods on stored features "
        "(bottleneck, fusion); 0 turns it off (default: 5 for a dataset of at most 2000 "
        "labelled images, else off)",
    )
    ensemble: str = setting(
        "off",
        "Save the average of a dataset's cross-validated methods as one model "
        "(<runs>/<dataset>/ensemble): off, beyond-noise (when cross-validation shows it right "
        "more often than the best method beyond noise) or always",
    )
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    def __post_init__(self) -> None:
        if self.ensemble not in ENSEMBLE_CHOICES:
            raise SettingsError(
                f"--ensemble takes {', '.join(ENSEMBLE_CHOICES)}, not {self.ensemble!r}"
            )
        if self.cv is not None and (self.cv < 0 or self.cv == 1):
            raise SettingsError(f"--cv takes 0 (off) or at least 2 folds, not {self.cv}")
        if not self.methods:
            raise SettingsError("--methods names no method")
        for name in self.methods:
            get_method(name)
        options = self.options
        if options.workers < 1 or options.threads < 1:
            raise SettingsError("--workers and --threads must be >= 1")
        if options.early_stopping_patience is not None and options.early_stopping_patience < 1:
            raise SettingsError("--early-stopping must be >= 1 epochs")
        if options.epoch_copies not in EPOCH_COPIES:
            raise SettingsError(
                f"--epoch-copies must be {' or '.join(EPOCH_COPIES)}: {options.epoch_copies}"
            )
        if options.scratch_image_size < 32:
            raise SettingsError("--scratch-image-size must be at least 32")
        if options.max_failures < 0:
            raise SettingsError("--max-failures must be >= 0")
        if not 0 <= options.abstain_rate < 1:
            raise SettingsError(f"--abstain-rate must be in [0, 1), got {options.abstain_rate}")


# What one epoch of a job on stored taps reads: "all" stored copies of every training image, or
# "one" copy of each image, the next one each epoch (the blog's epoch: every image once, freshly
# augmented).
EPOCH_COPIES = ("all", "one")
TRAIN_OPTION_HELP = {
    "workers": "Ray Train workers per job (>= 2 train one model in sync)",
    "threads": "CPUs (and TensorFlow threads) per worker",
    "use_gpu": "One GPU per worker",
    "early_stopping_patience": "Stop after N epochs without a better validation loss",
    "keep_best": "Keep the epoch with the best validation loss",
    "epoch_copies": "What an epoch on stored taps reads: 'all' stored copies, or 'one' copy of "
    "each image, the next one each epoch (the blog's epoch)",
    "seed": "Seed of initial weights and shuffling",
    "scratch_image_size": f"Input size of the small convnet (the blog's: {SCRATCH_IMAGE_SIZE})",
    "max_failures": "Times Ray Train restarts a job's workers (a lost node) from its checkpoint",
    "abstain_rate": "Share of held-out in-distribution images the saved model declines (its "
    "abstention thresholds are chosen for it)",
}


def train_option_help(name: str) -> str:
    default = getattr(TrainOptions(), name)
    return f"{TRAIN_OPTION_HELP[name]} (default: {'off' if default is None else default})"


def parse_assignments(values: list[str] | None, kind: type, what: str) -> dict[str, Any]:
    """``["finetune=8", "scratch=12,bottleneck=30"]`` as ``{method: value}``, each method known."""
    out: dict[str, Any] = {}
    for value in values or []:
        for item in filter(None, (v.strip() for v in value.split(","))):
            name, sep, number = item.partition("=")
            if not sep:
                raise SettingsError(f"{what} takes METHOD=VALUE, not {item!r}")
            get_method(name.strip())
            try:
                out[name.strip()] = kind(number)
            except ValueError:
                raise SettingsError(f"{what}: {number!r} is not a number") from None
    return out


def recipes_from_options(
    epochs: int | None, batch_size: int | None, epochs_for: dict[str, int],
    learning_rate_for: dict[str, float],
) -> dict[str, Recipe]:  # fmt: skip
    """Each method's recipe with the options given: per method, then for all, then its own."""
    recipes = {}
    for name, recipe in default_recipes().items():
        changes: dict[str, Any] = {}
        if name in epochs_for or epochs is not None:
            changes["epochs"] = epochs_for.get(name, epochs)
        if batch_size is not None:
            changes["batch_size"] = batch_size
        if name in learning_rate_for:
            changes["learning_rate"] = learning_rate_for[name]
        recipes[name] = replace(recipe, **changes)
    return recipes
