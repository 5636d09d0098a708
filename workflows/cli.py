"""The ``wf`` command line: parse, call one pipeline, print the result."""

from __future__ import annotations

import os
import sys
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
    for column in ("dataset", "images", "rejects", "rows", "shards done", "skipped", "failed",
                   "img/s", "store size"):  # fmt: skip
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for r in reports:
        table.add_row(
            r.dataset, str(r.images), str(r.rejects), str(r.rows), str(r.shards_done),
            str(r.shards_skipped), str(r.shards_failed),
            f"{r.images_per_second:.1f}" if r.shards_done else "-", _human_bytes(r.store_bytes),
        )  # fmt: skip
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
        "store": store, "shards": shards, "backbone": backbone, "weights": weights,
        "input_size": image_size, "dtype": dtype, "augment": augment, "seed": seed,
        "validation_fraction": validation_fraction, "runtime": runtime, "batch_size": batch_size,
        "threads_per_task": threads, "max_pixels": max_pixels, "cache_dir": cache_dir,
        "taps": tuple(t.strip() for t in taps.split(",") if t.strip()) if taps else None,
    }  # fmt: skip
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
    cache_dir: Annotated[
        str | None, typer.Option(help="Converted backbones cache. [default: ~/.cache/wf]")
    ] = None,
    address: AddressOption = None,
    num_cpus: NumCpusOption = None,
) -> None:
    """Generate a small shapes dataset and run the workflow on it, with no data of yours.

    Example: wf demo --dir wf-demo
    """
    from workflows.demo import generate_shapes_dataset
    from workflows.settings import ClusterSettings, DatasetSource, ExtractSettings

    data = generate_shapes_dataset(os.path.join(folder, "data", "shapes"), images_per_class)
    console.print(f"generated {images_per_class} images per class under {data}")
    extra = {"cache_dir": cache_dir} if cache_dir else {}
    settings = ExtractSettings(
        **extra,
        datasets=(DatasetSource(data),),
        store=os.path.join(folder, "store"),
        shards=shards,
        weights=weights,
        cluster=ClusterSettings(address=address, num_cpus=num_cpus),
    )
    _run_extract_with_progress(settings)


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
            name, f"{b.default_input_size}px", ", ".join(b.taps),
            "yes" if b.offline_imagenet else "no", b.summary,
        )  # fmt: skip
    out.print(table)
    for tap, text in TAP_DESCRIPTIONS.items():
        out.print(f"  {tap}: {text}")


def main() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        app()
    except WfError as error:
        console.print(f"[red]error:[/] {error}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
