"""The CLI's options, one alias each, their help and defaults taken from the settings.

``wf CMD --help`` is generated from these: a default changes in ``workflows/settings.py`` (or a
method's recipe) and the help follows.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from workflows.settings import (
    ClusterSettings,
    ExtractSettings,
    TrainSettings,
    option_help,
    train_option_help,
)


def _extract(name: str, *flags: str, shown: str | None = None) -> Any:
    return typer.Option(*flags, help=option_help(ExtractSettings, name, shown))


def _train(name: str, *flags: str) -> Any:
    return typer.Option(*flags, help=option_help(TrainSettings, name))


def _job(name: str, *flags: str) -> Any:
    return typer.Option(*flags, help=train_option_help(name))


Text = str | None
Number = int | None
Flag = bool | None

# Every command that starts or joins Ray.
Address = Annotated[
    Text,
    typer.Option("--address", envvar="RAY_ADDRESS", help=option_help(ClusterSettings, "address")),
]
NumCpus = Annotated[
    Number, typer.Option("--num-cpus", help=option_help(ClusterSettings, "num_cpus"))
]
Json = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON document on stdout.")
]
Verbose = Annotated[
    bool, typer.Option("--verbose", help="Show Ray's and TensorFlow's own log lines.")
]

# wf extract
DataRoots = Annotated[
    list[str] | None,
    typer.Argument(
        help="Dataset folders or URIs (CLASS/IMAGE or SPLIT/CLASS/IMAGE), or folders of them.",
        show_default=False,
    ),
]
Config = Annotated[
    Text, typer.Option(help="TOML file of [[datasets]] and settings; options here win.")
]
Store = Annotated[Text, _extract("store")]
Shards = Annotated[Number, _extract("shards")]
Backbone = Annotated[Text, _extract("backbone")]
Weights = Annotated[Text, _extract("weights")]
ImageSize = Annotated[Number, _extract("input_size", "--image-size")]
Taps = Annotated[Text, _extract("taps")]
Dtype = Annotated[Text, _extract("dtype")]
Augment = Annotated[Number, _extract("augment")]
Seed = Annotated[Number, _extract("seed")]
ValidationFraction = Annotated[float | None, _extract("validation_fraction")]
Runtime = Annotated[Text, _extract("runtime")]
Calibration = Annotated[Text, _extract("calibration")]
CalibrationImages = Annotated[Number, _extract("calibration_images")]
BatchSize = Annotated[Number, _extract("batch_size")]
Threads = Annotated[Number, _extract("threads_per_task", "--threads")]
MaxPixels = Annotated[Number, _extract("max_pixels")]
CacheDir = Annotated[Text, _extract("cache_dir", shown="~/.cache/wf")]
Wait = Annotated[Flag, _extract("wait", "--wait")]
DropEmptyClasses = Annotated[Flag, _extract("drop_empty_classes", "--drop-empty-classes")]

# wf train-all
TrainStore = Annotated[Text, _train("store")]
Runs = Annotated[Text, _train("runs")]
Datasets = Annotated[Text, _train("datasets")]
Methods = Annotated[Text, _train("methods")]
TrainBackbone = Annotated[Text, _train("backbone")]
MaxConcurrent = Annotated[Number, _train("max_concurrent_jobs", "--max-concurrent")]
Force = Annotated[bool, _train("force", "--force")]
Cv = Annotated[Number, _train("cv", "--cv")]
Ensemble = Annotated[Text, _train("ensemble", "--ensemble")]
Epochs = Annotated[Number, typer.Option(help="Epochs of every method (default: each method's own)")]
EpochsFor = Annotated[
    list[str] | None, typer.Option(help="METHOD=N: epochs of one method, e.g. finetune=8")
]
LearningRateFor = Annotated[
    list[str] | None, typer.Option(help="METHOD=RATE: learning rate of one method")
]
TrainBatchSize = Annotated[Number, typer.Option(help="Batch size per worker (default: 16)")]
Workers = Annotated[Number, _job("workers")]
TrainThreads = Annotated[Number, _job("threads")]
Gpu = Annotated[Flag, _job("use_gpu", "--gpu")]
EarlyStopping = Annotated[Number, _job("early_stopping_patience", "--early-stopping")]
KeepBest = Annotated[Flag, _job("keep_best", "--keep-best")]
EpochCopies = Annotated[Text, _job("epoch_copies")]
ScratchImageSize = Annotated[Number, _job("scratch_image_size")]
TrainSeed = Annotated[Number, _job("seed")]
MaxFailures = Annotated[Number, _job("max_failures")]
AbstainRate = Annotated[float | None, _job("abstain_rate", "--abstain-rate")]

# wf predict, evaluate
Model = Annotated[
    str, typer.Argument(help="A model.keras written by `wf train-all` (path or URI).")
]
Paths = Annotated[list[str], typer.Argument(help="Image files or folders (paths or URIs).")]
Output = Annotated[Text, typer.Option(help="Write here (.csv or .json; a path or URI).")]
Format = Annotated[Text, typer.Option("--format", help="csv or json (default: from --output).")]
MinConfidence = Annotated[
    float | None,
    typer.Option(
        "--min-confidence",
        min=0.0,
        max=1.0,
        help="Abstain below this top probability (default: the run's threshold)",
    ),
]
MaxDistance = Annotated[
    float | None,
    typer.Option(
        "--max-distance",
        min=0.0,
        max=2.0,
        help="Abstain when the image's embedding is farther than this from the labelled images "
        "(mean 1 - cosine to its 10 nearest; default: the run's threshold)",
    ),
]
Abstain = Annotated[bool, typer.Option(
    "--abstain/--no-abstain", help="Let the model decline low-confidence and out-of-distribution "
    "images, by the thresholds in its run's metrics.json")]  # fmt: skip
Folder = Annotated[str, typer.Argument(help="A labelled folder: one sub-folder per class.")]

# wf serve
Host = Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")]
Port = Annotated[int, typer.Option(help="Port to listen on.")]
ServeMethods = Annotated[Text, typer.Option(help="Comma-separated methods (default: every one).")]
Replicas = Annotated[int, typer.Option(help="Replicas of each model.")]
MaxReplicas = Annotated[Number, typer.Option(help="Autoscale each model up to this many replicas.")]
MaxBatchSize = Annotated[int, typer.Option(help="Requests batched into one forward pass.")]
BatchWaitMs = Annotated[float, typer.Option(help="Longest wait for a batch to fill, in ms.")]
MaxQueued = Annotated[int, typer.Option(help="Requests queued per model; past it, HTTP 503.")]
MaxBodyMb = Annotated[float, typer.Option(help="Largest request body, in MiB; past it, HTTP 413.")]

# wf audit
AuditOutput = Annotated[
    str, typer.Option(help="Where issues.csv, summary.json and report.html go.")
]
AuditBackbone = Annotated[str, typer.Option(help="Whose stored embeddings to audit.")]
Similarity = Annotated[float, typer.Option(help="Near duplicates: cosine at least this (0: off).")]
Relative = Annotated[
    float, typer.Option(help="... and distance at most this x the typical one (0: off).")
]
ExactOnly = Annotated[bool, typer.Option("--exact-only", help="Only byte-identical duplicates.")]
Neighbours = Annotated[
    int, typer.Option(help="Neighbours per image (near duplicates, outliers, label votes).")
]
Folds = Annotated[int, typer.Option(help="Cross-validation folds for the label issues.")]
OutlierScore = Annotated[float, typer.Option(help="Outliers: score at least this (1: typical).")]
FailOn = Annotated[Text, typer.Option(help="Exit 1 when any of these issues is found (for CI).")]
Resplit = Annotated[bool, typer.Option("--resplit", help="Write a group-aware split proposal.")]

# wf suggest, label
SuggestOutput = Annotated[
    str, typer.Option(help="Write DIR/<dataset>/suggestions.csv, .parquet and report.html here.")
]
Budget = Annotated[int, typer.Option(min=1, help="Images to suggest per dataset.")]
SuggestMethod = Annotated[
    str, typer.Option(help="The trained method that scores them: bottleneck or prototype.")
]
Dataset = Annotated[str, typer.Argument(help="The dataset folder (path or URI) to label in.")]
LabelsCsv = Annotated[
    str, typer.Argument(help="A CSV of path,label rows (paths relative to the dataset).")
]
LabelSplit = Annotated[str, typer.Option(help="The split the labelled images join.")]
