"""``wf extract``'s settings: the datasets, the store, the backbone and how to run it."""

from __future__ import annotations

from dataclasses import dataclass, field

from storage.errors import SettingsError
from storage.feature_store import FEATURE_DTYPES
from tasks.augment import AugmentPolicy
from tasks.backbones import DEFAULT_BACKBONE, get_backbone
from tasks.backbones.onnx_backbone import OnnxBackbone
from tasks.backbones.runtime import DEFAULT_RUNTIME, RUNTIMES, runtime_for
from tasks.images import DEFAULT_MAX_PIXELS
from workflows.settings import ClusterSettings, default_cache_dir, setting


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
