"""The ``wf`` command line: parse options into settings, call one pipeline, print its result.

Errors a user can act on are one line and an exit code (2: bad input or settings; 1: a run that
failed); ``--debug`` adds the traceback. Options and their help live in
:mod:`workflows.cli.options`, rendering in :mod:`workflows.cli.console`.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Annotated, Any

import typer

from workflows import __version__
from workflows.cli import options as o
from workflows.cli.console import err, out, say
from workflows.extract.settings import ExtractSettings
from workflows.settings import ClusterSettings
from workflows.train.settings import TrainSettings

app = typer.Typer(
    name="wf",
    help="Build strong image classifiers from very little data, as a Ray batch workflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain help: rich's boxes show <bool> after every flag, read [[datasets]] as markup and
    # break help texts into a narrow column at 80 columns.
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        out.print(f"wf {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")] = False,
) -> None:  # fmt: skip
    """wf: sharded bottleneck extraction into Parquet feature stores, and training on Ray."""
    state.debug = debug


class _State:
    """What the root options decide for the whole run, read by :mod:`workflows.cli.main`."""

    debug = False


state = _State()


def _given(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def _csv(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


@app.command()
def extract(
    data_roots: o.DataRoots = None, config: o.Config = None, store: o.Store = None,
    shards: o.Shards = None, backbone: o.Backbone = None, weights: o.Weights = None,
    image_size: o.ImageSize = None, taps: o.Taps = None, dtype: o.Dtype = None,
    augment: o.Augment = None, seed: o.Seed = None,
    validation_fraction: o.ValidationFraction = None, runtime: o.Runtime = None,
    calibration: o.Calibration = None, calibration_images: o.CalibrationImages = None,
    batch_size: o.BatchSize = None, threads: o.Threads = None, max_pixels: o.MaxPixels = None,
    cache_dir: o.CacheDir = None, wait: o.Wait = None,
    drop_empty_classes: o.DropEmptyClasses = None, json_output: o.Json = False,
    verbose: o.Verbose = False, address: o.Address = None, num_cpus: o.NumCpus = None,
) -> None:  # fmt: skip
    """Extract bottleneck features of image datasets into Parquet feature stores.

    Example: wf extract data/cats_vs_dogs --shards 8 --augment 2 --store store
    """
    from storage.filesystem import skip_pandas_probe
    from workflows.cli.console import extract_progress, show_extract
    from workflows.extract.config import load_config
    from workflows.extract.run import check_reports, run_extract
    from workflows.extract.settings import DatasetSource

    skip_pandas_probe()  # this process hands pyarrow no pandas object: 0.2-0.3 s saved
    values: dict[str, Any] = load_config(config) if config else {}
    if data_roots:
        values["datasets"] = tuple(DatasetSource(path) for path in data_roots)
    values.update(_given(
        store=store, shards=shards, backbone=backbone, weights=weights, input_size=image_size,
        dtype=dtype, augment=augment, seed=seed, validation_fraction=validation_fraction,
        runtime=runtime, batch_size=batch_size, threads_per_task=threads, max_pixels=max_pixels,
        cache_dir=cache_dir, taps=_csv(taps), wait=wait, drop_empty_classes=drop_empty_classes,
        calibration=calibration, calibration_images=calibration_images,
    ))  # fmt: skip
    values.setdefault("datasets", ())
    settings = ExtractSettings(**values, cluster=ClusterSettings(address, num_cpus, verbose))
    with extract_progress(not json_output) as progress:
        reports = run_extract(settings, progress, lambda line: say("wait", line, "yellow"))
    show_extract(f"wf extract: {settings.backbone} -> {settings.store}", reports, json_output)
    check_reports(reports)


@app.command("train-all")
def train_all(
    store: o.TrainStore = None, runs: o.Runs = None, datasets: o.Datasets = None,
    methods: o.Methods = None, backbone: o.TrainBackbone = None, epochs: o.Epochs = None,
    epochs_for: o.EpochsFor = None, learning_rate_for: o.LearningRateFor = None,
    batch_size: o.TrainBatchSize = None, workers: o.Workers = None, threads: o.TrainThreads = None,
    gpu: o.Gpu = None, early_stopping: o.EarlyStopping = None, keep_best: o.KeepBest = None,
    epoch_copies: o.EpochCopies = None, scratch_image_size: o.ScratchImageSize = None,
    seed: o.TrainSeed = None, max_failures: o.MaxFailures = None,
    abstain_rate: o.AbstainRate = None,
    max_concurrent: o.MaxConcurrent = None, force: o.Force = False, cv: o.Cv = None,
    ensemble: o.Ensemble = None,
    json_output: o.Json = False, verbose: o.Verbose = False, address: o.Address = None,
    num_cpus: o.NumCpus = None,
) -> None:  # fmt: skip
    """Train every method for every dataset in a feature store, on Ray Train.

    Example: wf train-all --store store --runs runs --methods bottleneck,finetune --epochs 20
    """
    from tasks.methods import TrainOptions
    from workflows.cli.console import show_train, train_progress
    from workflows.train.run import check_results, run_train_all
    from workflows.train.settings import parse_assignments, recipes_from_options

    options = replace(TrainOptions(), **_given(
        workers=workers, threads=threads, use_gpu=gpu, early_stopping_patience=early_stopping,
        keep_best=keep_best, epoch_copies=epoch_copies, scratch_image_size=scratch_image_size,
        seed=seed, max_failures=max_failures, abstain_rate=abstain_rate))  # fmt: skip
    epochs_of = parse_assignments(epochs_for, int, "--epochs-for")
    rates_of = parse_assignments(learning_rate_for, float, "--learning-rate-for")
    settings = TrainSettings(**_given(
        store=store, runs=runs, datasets=_csv(datasets), methods=_csv(methods), backbone=backbone,
        max_concurrent_jobs=max_concurrent, ensemble=ensemble), cv=cv,
        recipes=recipes_from_options(epochs, batch_size, epochs_of, rates_of), options=options,
        force=force, cluster=ClusterSettings(address, num_cpus, verbose))  # fmt: skip
    with train_progress(not json_output) as progress:
        results = run_train_all(settings, progress)
    show_train(settings.runs, results, json_output)
    check_results(results)


@app.command()
def predict(
    model: o.Model, paths: o.Paths, output: o.Output = None, output_format: o.Format = None,
    min_confidence: o.MinConfidence = None, max_distance: o.MaxDistance = None,
    abstain: o.Abstain = True, verbose: o.Verbose = False,
) -> None:  # fmt: skip
    """Classify image files or folders with a trained model; bad files are reported, not fatal.

    Example: wf predict runs/cats_vs_dogs/finetune/model.keras photos/ --output predictions.csv
    """
    from workflows.serve.predict import Thresholds, predict_paths, write_predictions

    predictions = predict_paths(model, paths, Thresholds(min_confidence, max_distance, abstain))
    text = write_predictions(predictions, output, output_format)
    if output is None:
        sys.stdout.write(text)
    bad = sum(1 for p in predictions if p.error)
    if bad:
        err.print(f"{bad} files could not be classified (see the error column)")


@app.command()
def evaluate(
    model: o.Model, folder: o.Folder, output: o.Output = None, json_output: o.Json = False,
    min_confidence: o.MinConfidence = None, max_distance: o.MaxDistance = None,
    abstain: o.Abstain = True, verbose: o.Verbose = False,
) -> None:  # fmt: skip
    """Accuracy, loss, per-class precision/recall/F1 and the confusion matrix on a labelled folder.

    Example: wf evaluate runs/cats_vs_dogs/finetune/model.keras data/cats_vs_dogs/test
    """
    import json

    from workflows.cli.console import show_evaluation
    from workflows.serve.predict import Thresholds, evaluate_folder, write_output

    metrics = evaluate_folder(model, folder, Thresholds(min_confidence, max_distance, abstain))
    if output:
        write_output(output, json.dumps(metrics, indent=2).encode())
    show_evaluation(folder, metrics, json_output)


@app.command()
def export(
    model: o.Model,
    export_format: Annotated[str, typer.Option("--format", help="onnx, tflite or tflite-int8.")],
    output: Annotated[str, typer.Option(help="The file to write (a path or URI).")],
    check: Annotated[str | None, typer.Option(help=(
        "A labelled folder to check the exported model on (default: the dataset's validation/)"
    ))] = None,
    calibration: Annotated[str | None, typer.Option(help=(
        "tflite-int8: images to calibrate on (default: the dataset's train/)"
    ))] = None,
    json_output: o.Json = False, verbose: o.Verbose = False,
) -> None:  # fmt: skip
    """Write a trained model as ONNX or TFLite, only if it gives the Keras model's answers.

    Example: wf export runs/d/bottleneck/model.keras --format onnx --output d.onnx
    """
    from workflows.cli.console import show_export
    from workflows.serve.export import ExportRefused, export_model

    try:
        report = export_model(model, export_format, output, check, calibration)
    except ExportRefused as refused:
        show_export(refused.report, json_output)
        raise
    show_export(report, json_output)


@app.command()
def verify(
    store: Annotated[str | None, typer.Argument(help="A feature store root (path or URI).")] = None,
    runs: Annotated[str | None, typer.Option(help="Also check a runs folder's artifacts.")] = None,
) -> None:
    """Check every part of a store (size, rows, SHA-256) and every file of a runs folder against
    what was recorded; one line per problem and exit 1 when any differs.

    Example: wf verify store --runs runs
    """
    from storage.verify import verify
    from workflows.cli.console import show_verify

    report = verify(store, runs)
    show_verify(report)
    if report.problems:
        raise typer.Exit(1)


@app.command()
def serve(
    runs: o.ServeRuns = None, host: o.Host = None, port: o.Port = None,
    datasets: o.ServeDatasets = None, methods: o.ServeMethods = None, replicas: o.Replicas = None,
    max_replicas: o.MaxReplicas = None, max_batch_size: o.MaxBatchSize = None,
    batch_wait_ms: o.BatchWaitMs = None, max_queued: o.MaxQueued = None,
    max_body_mb: o.MaxBodyMb = None, runtime: o.ServeRuntime = None,
    verbose: o.Verbose = False, address: o.Address = None, num_cpus: o.NumCpus = None,
) -> None:  # fmt: skip
    """Serve every trained model of a runs folder over HTTP (Ray Serve), until stopped.

    Example: wf serve --runs runs --port 8000
    """
    from workflows.cli.console import show_serving
    from workflows.serve.run import serve_forever
    from workflows.serve.settings import ServeSettings

    settings = ServeSettings(**_given(
        runs=runs, host=host, port=port, datasets=_csv(datasets), methods=_csv(methods),
        replicas=replicas, max_replicas=max_replicas, max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms, max_queued_requests=max_queued, max_body_mb=max_body_mb,
        runtime=runtime), cluster=ClusterSettings(address, num_cpus, verbose))  # fmt: skip
    serve_forever(settings, show_serving)


@app.command()
def audit(
    store: o.AuditStore = None, output: o.AuditOutput = None, datasets: o.AuditDatasets = None,
    backbone: o.AuditBackbone = None, similarity: o.Similarity = None,
    relative: o.Relative = None, exact_only: o.ExactOnly = None, neighbours: o.Neighbours = None,
    folds: o.Folds = None, outlier_score: o.OutlierScore = None, fail_on: o.FailOn = None,
    resplit: o.Resplit = None, json_output: o.Json = False, verbose: o.Verbose = False,
    address: o.Address = None, num_cpus: o.NumCpus = None,
) -> None:  # fmt: skip
    """Find duplicates, leaks across splits, outliers and label errors from a feature store.

    Example: wf audit --store store --output audit --fail-on leakage,conflicting_labels
    """
    from workflows.audit.run import check_fail_on, run_audit
    from workflows.audit.settings import AuditSettings
    from workflows.cli.console import show_audit

    settings = AuditSettings(**_given(
        store=store, output=output, datasets=_csv(datasets), backbone=backbone,
        neighbours=neighbours, similarity=similarity, relative=relative, exact_only=exact_only,
        outlier_score=outlier_score, folds=folds, fail_on=_csv(fail_on), resplit=resplit,
    ), cluster=ClusterSettings(address, num_cpus, verbose))  # fmt: skip
    summaries = run_audit(settings)
    show_audit(settings.output, summaries, json_output)
    check_fail_on(settings, summaries)


@app.command()
def suggest(
    store: o.SuggestStore = None, runs: o.SuggestRuns = None, datasets: o.SuggestDatasets = None,
    budget: o.Budget = None, output: o.SuggestOutput = None, method: o.SuggestMethod = None,
    backbone: o.SuggestBackbone = None, json_output: o.Json = False, verbose: o.Verbose = False,
) -> None:  # fmt: skip
    """Rank each dataset's unlabelled images for labelling: least sure first, spread out.

    Example: wf suggest --store store --runs runs --budget 100 --output suggestions
    """
    from workflows.cli.console import show_suggest
    from workflows.label.settings import SuggestSettings
    from workflows.label.suggest import run_suggest

    settings = SuggestSettings(**_given(
        store=store, runs=runs, output=output, datasets=_csv(datasets), budget=budget,
        method=method, backbone=backbone))  # fmt: skip
    show_suggest(settings.output, run_suggest(settings), json_output)


@app.command()
def label(
    dataset: o.Dataset, labels_csv: o.LabelsCsv, split: o.LabelSplit = "train",
    json_output: o.Json = False,
) -> None:  # fmt: skip
    """Move the images a path,label CSV names into their class folders, and log who and when.

    Example: wf label data/cats_vs_dogs labels.csv
    """
    from storage.errors import RunFailed
    from workflows.cli.console import show_label
    from workflows.label.apply import label_images

    report = label_images(dataset, labels_csv, split)
    show_label(dataset, report, json_output)
    if report.problems:
        raise RunFailed(f"{len(report.problems)} rows not applied (see above)")


@app.command()
def stores(
    store: Annotated[str, typer.Argument(help="A feature store root (path or URI).")] = "store",
    json_output: o.Json = False,
) -> None:
    """List what a feature store holds: datasets, backbones, images, rows, rejects, dates.

    Example: wf stores store
    """
    from workflows.cli.console import show_listing
    from workflows.cli.listing import list_stores

    show_listing(f"wf stores: {store}", list_stores(store), json_output)


@app.command()
def runs(
    folder: Annotated[str, typer.Argument(help="A runs folder (path or URI).")] = "runs",
    json_output: o.Json = False,
) -> None:
    """List the trained jobs of a runs folder: accuracy, epochs, when, model.

    Example: wf runs runs
    """
    from workflows.cli.console import show_listing
    from workflows.cli.listing import list_runs, shown_runs

    entries = list_runs(folder)
    show_listing(f"wf runs: {folder}", entries if json_output else shown_runs(entries), json_output)


@app.command()
def backbones() -> None:
    """List the registered backbones, their input sizes and taps.

    Example: wf backbones
    """
    from workflows.cli.console import show_registries

    show_registries(backbones=True)


@app.command()
def methods() -> None:
    """List the training methods and their recipes.

    Example: wf methods
    """
    from workflows.cli.console import show_registries

    show_registries(backbones=False)


@app.command()
def demo(
    folder: o.DemoDir = None, images_per_class: o.ImagesPerClass = None,
    shards: o.DemoShards = None, weights: o.DemoWeights = None, epochs: o.DemoEpochs = None,
    cache_dir: o.CacheDir = None, verbose: o.Verbose = False, address: o.Address = None,
    num_cpus: o.NumCpus = None,
) -> None:  # fmt: skip
    """Draw a small shapes dataset and run the whole workflow on it, with no data of yours:
    extract, train-all (the blog's three methods, few epochs), summary.

    Example: wf demo --dir wf-demo
    """
    from workflows.cli.console import show_extract, show_next_steps, show_train
    from workflows.cli.demo import DemoSettings, run_demo_with_progress
    from workflows.extract.run import check_reports
    from workflows.train.run import check_results

    settings = DemoSettings(**_given(
        folder=folder, images_per_class=images_per_class, shards=shards, weights=weights,
        epochs=epochs, cache_dir=cache_dir,
    ), cluster=ClusterSettings(address, num_cpus, verbose))  # fmt: skip
    result = run_demo_with_progress(settings)
    show_extract(f"wf demo: {result.data}", result.reports, False)
    check_reports(result.reports)
    show_train(result.runs, result.results, False)
    check_results(result.results)
    show_next_steps(result.runs)
