"""The ``wf`` command line: parse, call one pipeline, print the result."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from storage.errors import WfError
from workflows import __version__

app = typer.Typer(
    name="wf",
    help="Build strong image classifiers from very little data, as a Ray batch workflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out = Console()

AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address", envvar="RAY_ADDRESS", help="Ray cluster to use (default: start a local one)."
    ),
]
NumCpusOption = Annotated[
    int | None, typer.Option("--num-cpus", help="CPUs of the local Ray cluster (default: all).")
]


def _version(value: bool) -> None:
    if value:
        out.print(f"wf {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """wf: sharded bottleneck extraction into Parquet feature stores, on Ray."""


def _human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError  # pragma: no cover


def _run_extract_with_progress(settings: Any) -> list[Any]:
    from workflows.extract import run_extract

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>6.1f} img/s  rejects {task.fields[rejects]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        bars: dict[str, Any] = {}
        import time

        started = time.perf_counter()

        def update(totals: dict[str, tuple[int, int, int]]) -> None:
            elapsed = max(time.perf_counter() - started, 1e-9)
            for name, (done, planned, rejects) in totals.items():
                if name not in bars:
                    bars[name] = progress.add_task(name, total=planned, rate=0.0, rejects=0)
                progress.update(
                    bars[name], completed=done + rejects, rate=done / elapsed, rejects=rejects
                )

        reports = run_extract(settings, on_progress=update)
    table = Table(title=f"wf extract: {settings.backbone} -> {settings.store}")
    for column in (
        "dataset",
        "images",
        "rejects",
        "rows",
        "shards done",
        "skipped",
        "failed",
        "img/s",
        "store size",
    ):
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for r in reports:
        table.add_row(
            r.dataset,
            str(r.images),
            str(r.rejects),
            str(r.rows),
            str(r.shards_done),
            str(r.shards_skipped),
            str(r.shards_failed),
            f"{r.images_per_second:.1f}" if r.shards_done else "-",
            _human_bytes(r.store_bytes),
        )
    out.print(table)
    for r in reports:
        for warning in r.warnings:
            console.print(f"[yellow]warning:[/] {warning}")
        for failure in r.failures:
            console.print(f"[red]failed:[/] {r.dataset} {failure}")
        if r.rejects:
            console.print(
                f"{r.dataset}: {r.rejects} rejected files listed in "
                f"{os.path.join(os.path.dirname(r.manifest_path), 'rejects.parquet')}"
            )
    return reports


@app.command()
def extract(
    data_roots: Annotated[
        list[str] | None,
        typer.Argument(
            help="Dataset folders (CLASS/IMAGE or SPLIT/CLASS/IMAGE), or folders of datasets.",
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(help="TOML file naming [[datasets]] and settings; options given here win."),
    ] = None,
    store: Annotated[
        str | None, typer.Option(help="Feature store root: a path or a URI. [default: store]")
    ] = None,
    shards: Annotated[
        int | None, typer.Option(help="Shards per split, one Ray task each. [default: 8]")
    ] = None,
    backbone: Annotated[
        str | None,
        typer.Option(help="Backbone (see `wf backbones`). [default: efficientnet_lite0]"),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="imagenet, none (random) or a local weights file. [default: imagenet]"),
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Square input size in pixels. [default: the backbone's]")
    ] = None,
    taps: Annotated[
        str | None,
        typer.Option(help="Comma-separated taps to store. [default: bottleneck,last_block_input]"),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="float16 or float32 features. [default: float16]")
    ] = None,
    augment: Annotated[
        int | None, typer.Option(help="Augmented copies per training image. [default: 2]")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Run seed for augmentation. [default: 0]")
    ] = None,
    validation_fraction: Annotated[
        float | None,
        typer.Option(help="Held-out share when a dataset has no split folders. [default: 0.2]"),
    ] = None,
    runtime: Annotated[
        str | None, typer.Option(help="litert (fast) or keras. [default: litert]")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per batch through the backbone. [default: 32]")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="CPUs (and inference threads) per shard task. [default: 1]")
    ] = None,
    max_pixels: Annotated[
        int | None,
        typer.Option(
            help="Reject images with more pixels (decompression bombs). [default: Pillow's limit]"
        ),
    ] = None,
    cache_dir: Annotated[
        str | None, typer.Option(help="Converted backbones cache. [default: ~/.cache/wf]")
    ] = None,
    address: AddressOption = None,
    num_cpus: NumCpusOption = None,
) -> None:
    """Extract bottleneck features of image datasets into Parquet feature stores.

    Example: wf extract data/cats_vs_dogs --shards 8 --augment 2 --store store
    """
    from workflows.settings import ClusterSettings, DatasetSource, ExtractSettings, load_config

    values: dict[str, Any] = load_config(config) if config else {}
    if data_roots:
        values["datasets"] = tuple(DatasetSource(path) for path in data_roots)
    options = {
        "store": store,
        "shards": shards,
        "backbone": backbone,
        "weights": weights,
        "input_size": image_size,
        "dtype": dtype,
        "augment": augment,
        "seed": seed,
        "validation_fraction": validation_fraction,
        "runtime": runtime,
        "batch_size": batch_size,
        "threads_per_task": threads,
        "max_pixels": max_pixels,
        "cache_dir": cache_dir,
        "taps": tuple(t.strip() for t in taps.split(",") if t.strip()) if taps else None,
    }
    values.update({k: v for k, v in options.items() if v is not None})
    values.setdefault("datasets", ())
    values["cluster"] = ClusterSettings(address=address, num_cpus=num_cpus)
    reports = _run_extract_with_progress(ExtractSettings(**values))
    if any(r.shards_failed for r in reports):
        raise typer.Exit(1)


@app.command()
def demo(
    folder: Annotated[
        str, typer.Option("--dir", help="Where the demo data and store go.")
    ] = "wf-demo",
    images_per_class: Annotated[int, typer.Option(help="Generated images per class.")] = 40,
    shards: Annotated[int, typer.Option(help="Shards per split.")] = 4,
    weights: Annotated[str, typer.Option(help="imagenet or none.")] = "imagenet",
    epochs: Annotated[
        int, typer.Option(help="Epochs of the top and the convnet (fine-tuning: half).")
    ] = 10,
    cache_dir: Annotated[
        str | None, typer.Option(help="Converted backbones cache. [default: ~/.cache/wf]")
    ] = None,
    address: AddressOption = None,
    num_cpus: NumCpusOption = None,
) -> None:
    """Generate a small shapes dataset and run the whole workflow on it, with no data of yours:
    extract, train-all (the three methods, few epochs), summary.

    Example: wf demo --dir wf-demo
    """
    from workflows.cluster import ray_cluster
    from workflows.demo import generate_shapes_dataset
    from workflows.settings import (
        ClusterSettings,
        DatasetSource,
        ExtractSettings,
        TrainSettings,
        default_methods,
    )

    data = generate_shapes_dataset(os.path.join(folder, "data", "shapes"), images_per_class)
    console.print(f"generated {images_per_class} images per class under {data}")
    cluster = ClusterSettings(address=address, num_cpus=num_cpus)
    extra = {"cache_dir": cache_dir} if cache_dir else {}
    extract_settings = ExtractSettings(
        **extra,
        datasets=(DatasetSource(data),),
        store=os.path.join(folder, "store"),
        shards=shards,
        weights=weights,
        cluster=cluster,
    )
    train_settings = TrainSettings(
        store=extract_settings.store,
        runs=os.path.join(folder, "runs"),
        method_settings=default_methods(
            bottleneck=epochs, finetune=max(1, epochs // 2), scratch=epochs
        ),
        scratch_image_size=96,
        cluster=cluster,
    )
    with ray_cluster(cluster):  # one cluster for both halves
        _run_extract_with_progress(extract_settings)
        results = _train_all_with_progress(train_settings)
    if any(r.status == "failed" for r in results):
        raise typer.Exit(1)


def _train_all_with_progress(settings: Any) -> list[Any]:
    from rich.live import Live

    from workflows.train import run_train_all, summary_rows

    def render(status: dict[str, dict]) -> Table:
        table = Table(title="wf train-all: jobs")
        for column in ("job", "state", "epoch"):
            table.add_column(column)
        colours = {"running": "cyan", "done": "green", "failed": "red", "skipped": "yellow"}
        for key, facts in status.items():
            colour = colours.get(facts["state"], "white")
            table.add_row(
                key, f"[{colour}]{facts['state']}[/]", f"{facts['epoch']}/{facts['epochs']}"
            )
        return table

    with Live(Table(title="wf train-all: starting"), console=console, refresh_per_second=2) as live:
        results = run_train_all(settings, on_progress=lambda status: live.update(render(status)))
    rows = summary_rows(results)
    table = Table(title=f"wf train-all: {settings.runs}")
    for column in rows[0] if rows else []:
        table.add_column(column)
    for row in rows:
        table.add_row(*row.values())
    out.print(table)
    out.print(f"summary: {os.path.join(settings.runs, 'summary.md')} and summary.html")
    return results


@app.command("train-all")
def train_all(
    store: Annotated[
        str, typer.Option(help="Feature store root written by `wf extract`.")
    ] = "store",
    runs: Annotated[str, typer.Option(help="Where models, metrics and plots go.")] = "runs",
    datasets: Annotated[
        str | None, typer.Option(help="Comma-separated datasets. [default: all in the store]")
    ] = None,
    methods: Annotated[
        str, typer.Option(help="Comma-separated: bottleneck, finetune, scratch.")
    ] = "bottleneck,finetune,scratch",
    backbone: Annotated[
        str | None,
        typer.Option(
            help="Which backbone's store to train on. [default: efficientnet_lite0 if present]"
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option(help="Ray Train workers per job (>= 2 trains in sync).")
    ] = 1,
    threads: Annotated[int, typer.Option(help="CPUs (and TensorFlow threads) per worker.")] = 1,
    gpu: Annotated[bool, typer.Option("--gpu", help="One GPU per worker.")] = False,
    epochs: Annotated[
        int | None, typer.Option(help="Epochs for every method. [default: 50, the blog's]")
    ] = None,
    bottleneck_epochs: Annotated[
        int | None, typer.Option(help="Epochs of the bottleneck top.")
    ] = None,
    finetune_epochs: Annotated[int | None, typer.Option(help="Epochs of fine-tuning.")] = None,
    scratch_epochs: Annotated[int | None, typer.Option(help="Epochs of the small convnet.")] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size per worker (the blog's: 16).")] = 16,
    finetune_learning_rate: Annotated[
        float | None, typer.Option(help="SGD learning rate of fine-tuning. [default: 1e-4]")
    ] = None,
    early_stopping: Annotated[
        int | None, typer.Option(help="Stop after N epochs without a better validation loss.")
    ] = None,
    keep_best: Annotated[
        bool, typer.Option("--keep-best", help="Keep the epoch with the best validation loss.")
    ] = False,
    epoch_copies: Annotated[
        str,
        typer.Option(
            help="What an epoch on stored taps reads: 'all' stored copies of every training "
            "image, or 'one' copy of each image, the next one each epoch (the blog's epoch)."
        ),
    ] = "all",
    scratch_image_size: Annotated[
        int, typer.Option(help="Input size of the small convnet (the blog's: 150).")
    ] = 150,
    max_concurrent: Annotated[
        int | None, typer.Option(help="Jobs at once. [default: CPUs / (workers x threads)]")
    ] = None,
    max_failures: Annotated[
        int, typer.Option(help="Ray Train retries per job, resuming from the last checkpoint.")
    ] = 0,
    force: Annotated[
        bool, typer.Option("--force", help="Retrain jobs that already have artifacts.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of initial weights and shuffling.")] = 0,
    address: AddressOption = None,
    num_cpus: NumCpusOption = None,
) -> None:
    """Train the Keras blog's three methods for every dataset in a feature store, on Ray Train.

    Example: wf train-all --store store --runs runs --methods bottleneck,finetune --epochs 20
    """
    from workflows.settings import (
        BLOG_EPOCHS,
        ClusterSettings,
        MethodSettings,
        TrainSettings,
        default_methods,
    )

    defaults = default_methods()

    def method(name: str, specific: int | None, **extra: Any) -> MethodSettings:
        return replace(
            defaults[name],
            epochs=specific or epochs or BLOG_EPOCHS,
            batch_size=batch_size,
            **{k: v for k, v in extra.items() if v is not None},
        )

    settings = TrainSettings(
        store=store,
        runs=runs,
        datasets=tuple(d.strip() for d in datasets.split(",") if d.strip()) if datasets else None,
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        backbone=backbone,
        method_settings={
            "bottleneck": method("bottleneck", bottleneck_epochs),
            "finetune": method("finetune", finetune_epochs, learning_rate=finetune_learning_rate),
            "scratch": method("scratch", scratch_epochs),
        },
        workers=workers,
        threads_per_worker=threads,
        use_gpu=gpu,
        early_stopping_patience=early_stopping,
        keep_best=keep_best,
        epoch_copies=epoch_copies,
        seed=seed,
        scratch_image_size=scratch_image_size,
        max_concurrent_jobs=max_concurrent,
        max_failures=max_failures,
        force=force,
        cluster=ClusterSettings(address=address, num_cpus=num_cpus),
    )
    results = _train_all_with_progress(settings)
    for result in results:
        if result.status == "failed":
            console.print(f"[red]failed:[/] {result.dataset}/{result.method}: {result.error}")
    if any(r.status == "failed" for r in results):
        raise typer.Exit(1)


@app.command()
def predict(
    model: Annotated[str, typer.Argument(help="A model.keras written by `wf train-all`.")],
    paths: Annotated[list[str], typer.Argument(help="Image files or folders.")],
    output: Annotated[
        str | None, typer.Option(help="Write here (.csv or .json). [default: CSV to stdout]")
    ] = None,
    output_format: Annotated[
        str | None, typer.Option("--format", help="csv or json. [default: from --output]")
    ] = None,
) -> None:
    """Classify image files or folders with a trained model; bad files are reported, not fatal.

    Example: wf predict runs/cats_vs_dogs/finetune/model.keras photos/ --output predictions.csv
    """
    from workflows.predict import predict_paths, write_predictions

    predictions = predict_paths(model, paths)
    text = write_predictions(predictions, output, output_format)
    if output is None:
        out.print(text, end="", markup=False, highlight=False, soft_wrap=True)
    bad = [p for p in predictions if p.error]
    if bad:
        console.print(f"{len(bad)} files could not be classified (see the error column)")


@app.command()
def evaluate(
    model: Annotated[str, typer.Argument(help="A model.keras written by `wf train-all`.")],
    dataset_split: Annotated[
        str, typer.Argument(help="A labelled folder: one sub-folder per class.")
    ],
    output: Annotated[str | None, typer.Option(help="Write the metrics here as JSON.")] = None,
) -> None:
    """Accuracy, loss, per-class precision/recall/F1 and the confusion matrix on a labelled folder.

    Example: wf evaluate runs/cats_vs_dogs/finetune/model.keras data/cats_vs_dogs/test
    """
    import json

    from workflows.predict import evaluate_folder

    metrics = evaluate_folder(model, dataset_split)
    table = Table(title=f"wf evaluate: {dataset_split}")
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column)
    for name, values in metrics["per_class"].items():
        table.add_row(name, *(str(values[k]) for k in ("precision", "recall", "f1", "support")))
    out.print(table)
    out.print(
        f"accuracy {metrics['accuracy']:.4f}  loss {metrics['loss']:.4f}  "
        f"examples {metrics['examples']}  rejected {len(metrics['rejects'])}"
    )
    if output:
        with open(output, "w") as handle:
            json.dump(metrics, handle, indent=2)


@app.command()
def backbones() -> None:
    """List the registered backbones, their input sizes and taps.

    Example: wf backbones
    """
    from tasks.backbones import BACKBONES, DEFAULT_BACKBONE, TAP_DESCRIPTIONS

    table = Table(title="wf backbones")
    for column in ("name", "input", "taps (default first)", "offline ImageNet", "about"):
        table.add_column(column)
    for b in BACKBONES.values():
        name = f"{b.name} (default)" if b.name == DEFAULT_BACKBONE else b.name
        table.add_row(
            name,
            f"{b.default_input_size}px",
            ", ".join(b.taps),
            "yes" if b.offline_imagenet else "no",
            b.summary,
        )
    out.print(table)
    for tap, text in TAP_DESCRIPTIONS.items():
        out.print(f"  {tap}: {text}")


def main() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from workflows.settings import worker_env

    os.environ.update(worker_env())
    try:
        app()
    except WfError as error:
        console.print(f"[red]error:[/] {error}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
