"""The CLI's options, one alias each, their help and defaults taken from the settings.

``wf CMD --help`` is generated from these: a default changes in the command's
``workflows/<command>/settings.py`` (or a method's recipe) and the help follows.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from workflows.audit.settings import AuditSettings
from workflows.cli.demo import DemoSettings
from workflows.extract.settings import ExtractSettings
from workflows.label.settings import SuggestSettings
from workflows.serve.settings import ServeSettings
from workflows.settings import ClusterSettings, option_help
from workflows.train.settings import TrainSettings, train_option_help


def _of(settings: type, name: str, *flags: str, shown: str | None = None) -> Any:
    """An option whose help and default are those of field ``name`` of ``settings``."""
    return typer.Option(*flags, help=option_help(settings, name, shown))


def _extract(name: str, *flags: str, shown: str | None = None) -> Any:
    return _of(ExtractSettings, name, *flags, shown=shown)


def _train(name: str, *flags: str) -> Any:
    return _of(TrainSettings, name, *flags)


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


def _native_output(verbose: bool) -> bool:
    """Typer calls this as it parses ``--verbose`` (given or not), before the command imports
    TensorFlow or Ray: without it, their native start-up chatter is filtered from stderr."""
    if not verbose:
        from workflows.cli.quiet import filter_native_stderr

        filter_native_stderr()
    return verbose


Verbose = Annotated[
    bool,
    typer.Option(
        "--verbose", help="Show Ray's and TensorFlow's own log lines.", callback=_native_output
    ),
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
Host = Annotated[Text, _of(ServeSettings, "host")]
Port = Annotated[Number, _of(ServeSettings, "port")]
ServeRuns = Annotated[Text, _of(ServeSettings, "runs")]
ServeDatasets = Annotated[Text, _of(ServeSettings, "datasets")]
ServeMethods = Annotated[Text, _of(ServeSettings, "methods")]
Replicas = Annotated[Number, _of(ServeSettings, "replicas")]
MaxReplicas = Annotated[Number, _of(ServeSettings, "max_replicas")]
MaxBatchSize = Annotated[Number, _of(ServeSettings, "max_batch_size")]
BatchWaitMs = Annotated[float | None, _of(ServeSettings, "batch_wait_ms")]
MaxQueued = Annotated[Number, _of(ServeSettings, "max_queued_requests", "--max-queued")]
MaxBodyMb = Annotated[float | None, _of(ServeSettings, "max_body_mb")]
ServeRuntime = Annotated[Text, _of(ServeSettings, "runtime")]

# wf audit
AuditStore = Annotated[Text, _of(AuditSettings, "store")]
AuditOutput = Annotated[Text, _of(AuditSettings, "output")]
AuditDatasets = Annotated[Text, _of(AuditSettings, "datasets")]
AuditBackbone = Annotated[Text, _of(AuditSettings, "backbone")]
Similarity = Annotated[float | None, _of(AuditSettings, "similarity")]
Relative = Annotated[float | None, _of(AuditSettings, "relative")]
ExactOnly = Annotated[Flag, _of(AuditSettings, "exact_only", "--exact-only")]
Neighbours = Annotated[Number, _of(AuditSettings, "neighbours")]
Folds = Annotated[Number, _of(AuditSettings, "folds")]
OutlierScore = Annotated[float | None, _of(AuditSettings, "outlier_score")]
FailOn = Annotated[Text, _of(AuditSettings, "fail_on")]
Resplit = Annotated[Flag, _of(AuditSettings, "resplit", "--resplit")]

# wf suggest, label
SuggestStore = Annotated[Text, _of(SuggestSettings, "store")]
SuggestRuns = Annotated[Text, _of(SuggestSettings, "runs")]
SuggestDatasets = Annotated[Text, _of(SuggestSettings, "datasets")]
SuggestOutput = Annotated[Text, _of(SuggestSettings, "output")]
Budget = Annotated[Number, _of(SuggestSettings, "budget")]
SuggestMethod = Annotated[Text, _of(SuggestSettings, "method")]
SuggestBackbone = Annotated[Text, _of(SuggestSettings, "backbone")]
Dataset = Annotated[str, typer.Argument(help="The dataset folder (path or URI) to label in.")]
LabelsCsv = Annotated[
    str, typer.Argument(help="A CSV of path,label rows (paths relative to the dataset).")
]
LabelSplit = Annotated[str, typer.Option(help="The split the labelled images join.")]

# wf demo
DemoDir = Annotated[Text, _of(DemoSettings, "folder", "--dir")]
ImagesPerClass = Annotated[Number, _of(DemoSettings, "images_per_class")]
DemoShards = Annotated[Number, _of(DemoSettings, "shards")]
DemoWeights = Annotated[Text, _of(DemoSettings, "weights")]
DemoEpochs = Annotated[Number, _of(DemoSettings, "epochs")]
