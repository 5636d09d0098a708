"""``wf train-all``'s settings: the store and runs folder, the methods and their recipes, the
jobs' options, cross-validation and the ensemble."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from storage.errors import SettingsError
from tasks.backbones import DEFAULT_BACKBONE
from tasks.methods import DEFAULT_METHODS, METHODS, Recipe, TrainOptions, get_method
from workflows.settings import ClusterSettings, setting

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
        options = self.options
        for name in self.methods:
            get_method(name).check_options(options)
        if options.workers < 1 or options.threads < 1:
            raise SettingsError("--workers and --threads must be >= 1")
        if options.early_stopping_patience is not None and options.early_stopping_patience < 1:
            raise SettingsError("--early-stopping must be >= 1 epochs")
        if options.epoch_copies not in EPOCH_COPIES:
            raise SettingsError(
                f"--epoch-copies must be {' or '.join(EPOCH_COPIES)}: {options.epoch_copies}"
            )
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
    "max_failures": "Times Ray Train restarts a job's workers (a lost node) from its checkpoint",
    "abstain_rate": "Share of held-out in-distribution images the saved model declines (its "
    "abstention thresholds are chosen for it)",
    # and each method's own (the method declares them: Method.options)
    **{option.field: option.help for method in METHODS.values() for option in method.options},
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
