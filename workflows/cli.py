"""The ``wf`` command line: parse options into settings, call one pipeline, print its result.

Errors a user can act on are one line and an exit code (2: bad input or settings; 1: a run that
failed); ``--debug`` adds the traceback.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, replace
from typing import Annotated, Any

import typer

from storage.errors import RunFailed, WfError
from workflows import __version__
from workflows.console import err, out, print_json, print_table, say
from workflows.settings import (
    ClusterSettings,
    ExtractSettings,
    TrainSettings,
    option_help,
    train_option_help,
)

app = typer.Typer(
    name="wf",
    help="Build strong image classifiers from very little data, as a Ray batch workflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _help(name: str, cls: type = ExtractSettings) -> str:
    return option_help(cls, name)


Address = Annotated[
    str | None,
    typer.Option("--address", envvar="RAY_ADDRESS", help=_help("address", ClusterSettings)),
]
NumCpus = Annotated[int | None, typer.Option("--num-cpus", help=_help("num_cpus", ClusterSettings))]
Json = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON document on stdout.")
]
Verbose = Annotated[
    bool, typer.Option("--verbose", help="Show Ray's and TensorFlow's own log lines.")
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
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")] = False,
) -> None:
    """wf: sharded bottleneck extraction into Parquet feature stores, and training on Ray."""


def _given(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def _csv(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


@app.command()
def extract(
    data_roots: Annotated[
        list[str] | None,
        typer.Argument(
            help="Dataset folders or URIs (CLASS/IMAGE or SPLIT/CLASS/IMAGE), or folders of them.",
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(help="TOML file naming [[datasets]] and settings; options given here win."),
    ] = None,
    store: Annotated[str | None, typer.Option(help=_help("store"))] = None,
    shards: Annotated[int | None, typer.Option(help=_help("shards"))] = None,
    backbone: Annotated[str | None, typer.Option(help=_help("backbone"))] = None,
    weights: Annotated[str | None, typer.Option(help=_help("weights"))] = None,
    image_size: Annotated[
        int | None, typer.Option(help=_help("input_size", ExtractSettings))
    ] = None,
    taps: Annotated[str | None, typer.Option(help=_help("taps"))] = None,
    dtype: Annotated[str | None, typer.Option(help=_help("dtype"))] = None,
    augment: Annotated[int | None, typer.Option(help=_help("augment"))] = None,
    seed: Annotated[int | None, typer.Option(help=_help("seed"))] = None,
    validation_fraction: Annotated[
        float | None, typer.Option(help=_help("validation_fraction"))
    ] = None,
    runtime: Annotated[str | None, typer.Option(help=_help("runtime"))] = None,
    batch_size: Annotated[int | None, typer.Option(help=_help("batch_size"))] = None,
    threads: Annotated[int | None, typer.Option(help=_help("threads_per_task"))] = None,
    max_pixels: Annotated[int | None, typer.Option(help=_help("max_pixels"))] = None,
    cache_dir: Annotated[
        str | None, typer.Option(help=option_help(ExtractSettings, "cache_dir", "~/.cache/wf"))
    ] = None,
    wait: Annotated[bool | None, typer.Option("--wait", help=_help("wait"))] = None,
    drop_empty_classes: Annotated[
        bool | None, typer.Option("--drop-empty-classes", help=_help("drop_empty_classes"))
    ] = None,
    json_output: Json = False,
    verbose: Verbose = False,
    address: Address = None,
    num_cpus: NumCpus = None,
) -> None:
    """Extract bottleneck features of image datasets into Parquet feature stores.

    Example: wf extract data/cats_vs_dogs --shards 8 --augment 2 --store store
    """
    from workflows.config import load_config
    from workflows.console import extract_progress
    from workflows.extract import run_extract
    from workflows.settings import DatasetSource

    values: dict[str, Any] = load_config(config) if config else {}
    if data_roots:
        values["datasets"] = tuple(DatasetSource(path) for path in data_roots)
    values.update(_given(
        store=store, shards=shards, backbone=backbone, weights=weights, input_size=image_size,
        dtype=dtype, augment=augment, seed=seed, validation_fraction=validation_fraction,
        runtime=runtime, batch_size=batch_size, threads_per_task=threads, max_pixels=max_pixels,
        cache_dir=cache_dir, taps=_csv(taps), wait=wait, drop_empty_classes=drop_empty_classes,
    ))  # fmt: skip
    values.setdefault("datasets", ())
    values["cluster"] = ClusterSettings(address, num_cpus, verbose)
    settings = ExtractSettings(**values)
    with extract_progress(not json_output) as progress:
        reports = run_extract(settings, progress, lambda message: say("wait", message, "yellow"))
    _report_extract(settings, reports, json_output)


def _report_extract(settings: ExtractSettings, reports: list[Any], json_output: bool) -> None:
    from workflows.console import human_bytes

    if json_output:
        print_json([asdict(r) for r in reports])
    else:
        print_table(f"wf extract: {settings.backbone} -> {settings.store}", [
            {"dataset": r.dataset, "images": str(r.images), "rejects": str(r.rejects),
             "rows": str(r.rows), "shards done": str(r.shards_done),
             "skipped": str(r.shards_skipped), "failed": str(r.shards_failed),
             "img/s": f"{r.images_per_second:.1f}" if r.shards_done else "-",
             "store size": human_bytes(r.store_bytes)} for r in reports])  # fmt: skip
    for r in reports:
        for warning in r.warnings:
            say("warning", warning, "yellow")
        for failure in r.failures:
            say("failed", f"{r.dataset} {failure}")
        if r.rejects:
            say(r.dataset, f"{r.rejects} rejected files listed in {r.rejects_path}", "bold")
    failed = [r for r in reports if r.shards_failed]
    if failed:
        raise RunFailed(
            f"{sum(r.shards_failed for r in failed)} shards failed; "
            "run the same command again to retry them"
        )
    empty = [
        f"{r.dataset}: class {', '.join(map(repr, r.empty_classes))}"
        for r in reports
        if r.empty_classes
    ]
    if empty:
        raise WfError(f"no usable training image in {'; '.join(empty)} (see the rejects); "
                      "fix the files, or pass --drop-empty-classes")  # fmt: skip


@app.command("train-all")
def train_all(
    store: Annotated[str | None, typer.Option(help=_help("store", TrainSettings))] = None,
    runs: Annotated[str | None, typer.Option(help=_help("runs", TrainSettings))] = None,
    datasets: Annotated[str | None, typer.Option(help=_help("datasets", TrainSettings))] = None,
    methods: Annotated[str | None, typer.Option(help=_help("methods", TrainSettings))] = None,
    backbone: Annotated[str | None, typer.Option(help=_help("backbone", TrainSettings))] = None,
    epochs: Annotated[
        int | None,
        typer.Option(help="Epochs of every method (default: each method's own; the blog's 50)"),
    ] = None,
    epochs_for: Annotated[
        list[str] | None,
        typer.Option(help="METHOD=N epochs of one method, e.g. finetune=8 (repeatable)"),
    ] = None,
    learning_rate_for: Annotated[
        list[str] | None,
        typer.Option(help="METHOD=RATE learning rate of one method, e.g. finetune=3e-4"),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Batch size per worker (default: the blog's 16)")
    ] = None,
    workers: Annotated[int | None, typer.Option(help=train_option_help("workers"))] = None,
    threads: Annotated[int | None, typer.Option(help=train_option_help("threads"))] = None,
    gpu: Annotated[bool | None, typer.Option("--gpu", help=train_option_help("use_gpu"))] = None,
    early_stopping: Annotated[
        int | None, typer.Option(help=train_option_help("early_stopping_patience"))
    ] = None,
    keep_best: Annotated[
        bool | None, typer.Option("--keep-best", help=train_option_help("keep_best"))
    ] = None,
    epoch_copies: Annotated[
        str | None, typer.Option(help=train_option_help("epoch_copies"))
    ] = None,
    scratch_image_size: Annotated[
        int | None, typer.Option(help=train_option_help("scratch_image_size"))
    ] = None,
    seed: Annotated[int | None, typer.Option(help=train_option_help("seed"))] = None,
    max_failures: Annotated[
        int | None, typer.Option(help=train_option_help("max_failures"))
    ] = None,
    max_concurrent: Annotated[
        int | None, typer.Option(help=_help("max_concurrent_jobs", TrainSettings))
    ] = None,
    force: Annotated[bool, typer.Option("--force", help=_help("force", TrainSettings))] = False,
    json_output: Json = False,
    verbose: Verbose = False,
    address: Address = None,
    num_cpus: NumCpus = None,
) -> None:
    """Train every method for every dataset in a feature store, on Ray Train.

    Example: wf train-all --store store --runs runs --methods bottleneck,finetune --epochs 20
    """
    from tasks.methods import TrainOptions
    from workflows.console import train_progress
    from workflows.settings import parse_assignments, recipes_from_options
    from workflows.train import run_train_all

    options = replace(TrainOptions(), **_given(
        workers=workers, threads=threads, use_gpu=gpu, early_stopping_patience=early_stopping,
        keep_best=keep_best, epoch_copies=epoch_copies, scratch_image_size=scratch_image_size,
        seed=seed, max_failures=max_failures))  # fmt: skip
    epochs_of = parse_assignments(epochs_for, int, "--epochs-for")
    rates_of = parse_assignments(learning_rate_for, float, "--learning-rate-for")
    recipes = recipes_from_options(epochs, batch_size, epochs_of, rates_of)
    settings = TrainSettings(**_given(
        store=store, runs=runs, datasets=_csv(datasets), methods=_csv(methods), backbone=backbone,
        max_concurrent_jobs=max_concurrent), recipes=recipes, options=options, force=force,
        cluster=ClusterSettings(address, num_cpus, verbose))  # fmt: skip
    with train_progress(not json_output) as progress:
        results = run_train_all(settings, progress)
    _report_train(settings, results, json_output)


def _report_train(settings: TrainSettings, results: list[Any], json_output: bool) -> None:
    from workflows.summary import summary_rows

    if json_output:
        print_json([asdict(r) for r in results])
    else:
        print_table(f"wf train-all: {settings.runs}", summary_rows(results))
        out.print(f"summary: {settings.runs.rstrip('/')}/summary.md and summary.html")
    failed = [r for r in results if r.status == "failed"]
    for result in failed:
        say("failed", f"{result.dataset}/{result.method}: {result.error}")
    if failed:
        raise RunFailed(f"{len(failed)} of {len(results)} jobs failed")


@app.command()
def predict(
    model: Annotated[
        str, typer.Argument(help="A model.keras written by `wf train-all` (a path or URI).")
    ],
    paths: Annotated[list[str], typer.Argument(help="Image files or folders (paths or URIs).")],
    output: Annotated[
        str | None, typer.Option(help="Write here (.csv or .json). (default: CSV to stdout)")
    ] = None,
    output_format: Annotated[
        str | None, typer.Option("--format", help="csv or json. (default: from --output)")
    ] = None,
) -> None:
    """Classify image files or folders with a trained model; bad files are reported, not fatal.

    Example: wf predict runs/cats_vs_dogs/finetune/model.keras photos/ --output predictions.csv
    """
    from workflows.predict import predict_paths, write_predictions

    predictions = predict_paths(model, paths)
    text = write_predictions(predictions, output, output_format)
    if output is None:
        sys.stdout.write(text)
    bad = [p for p in predictions if p.error]
    if bad:
        err.print(f"{len(bad)} files could not be classified (see the error column)")


@app.command()
def evaluate(
    model: Annotated[
        str, typer.Argument(help="A model.keras written by `wf train-all` (a path or URI).")
    ],
    folder: Annotated[str, typer.Argument(help="A labelled folder: one sub-folder per class.")],
    output: Annotated[str | None, typer.Option(help="Write the metrics here as JSON.")] = None,
    json_output: Json = False,
) -> None:
    """Accuracy, loss, per-class precision/recall/F1 and the confusion matrix on a labelled folder.

    Example: wf evaluate runs/cats_vs_dogs/finetune/model.keras data/cats_vs_dogs/test
    """
    import json

    from workflows.predict import evaluate_folder, write_output

    metrics = evaluate_folder(model, folder)
    if output:
        write_output(output, json.dumps(metrics, indent=2).encode())
    if json_output:
        print_json(metrics)
        return
    print_table(f"wf evaluate: {folder}", [
        {"class": name, **{k: str(v[k]) for k in ("precision", "recall", "f1", "support")}}
        for name, v in metrics["per_class"].items()])  # fmt: skip
    out.print(f"accuracy {metrics['accuracy']:.4f}  loss {metrics['loss']:.4f}  "
              f"examples {metrics['examples']}  rejected {len(metrics['rejects'])}")  # fmt: skip


@app.command()
def verify(
    store: Annotated[
        str | None, typer.Argument(help="A feature store root (a path or URI).")
    ] = None,
    runs: Annotated[str | None, typer.Option(help="Also check a runs folder's artifacts.")] = None,
) -> None:
    """Check every part file of a store (size, rows, SHA-256) and every model file of a runs
    folder against what was recorded; exit 1 and one line per problem when any differs.

    Example: wf verify store --runs runs
    """
    from storage.layout import StoreLayout
    from storage.runs import RunsLayout
    from storage.verify import VerifyReport, verify_runs, verify_store
    from workflows.console import human_bytes

    if store is None and runs is None:
        raise WfError("name a STORE, --runs RUNS, or both")
    report = VerifyReport()
    if store is not None:
        verify_store(StoreLayout.at(store), report)
    if runs is not None:
        verify_runs(RunsLayout(runs), report)
    for problem in report.problems:
        say("mismatch", problem)
    out.print(f"checked {report.checked} files ({human_bytes(report.bytes)}): "
              f"{len(report.problems) or 'no'} problems")  # fmt: skip
    if report.problems:
        raise typer.Exit(1)


@app.command()
def backbones() -> None:
    """List the registered backbones, their input sizes and taps.

    Example: wf backbones
    """
    from tasks.backbones import BACKBONES, DEFAULT_BACKBONE, TAP_DESCRIPTIONS

    print_table("wf backbones", [
        {"name": f"{b.name} (default)" if b.name == DEFAULT_BACKBONE else b.name,
         "input": f"{b.default_input_size}px", "taps": ", ".join(b.taps),
         "offline ImageNet": "yes" if b.offline_imagenet else "no", "about": b.summary}
        for b in BACKBONES.values()])  # fmt: skip
    for tap, text in TAP_DESCRIPTIONS.items():
        out.print(f"  {tap}: {text}")


@app.command()
def methods() -> None:
    """List the training methods and their default recipes.

    Example: wf methods
    """
    from tasks.methods import DEFAULT_METHODS, METHODS

    print_table("wf methods", [
        {"name": m.name, "default": "yes" if m.name in DEFAULT_METHODS else "no",
         "reads": ", ".join(m.taps) or "images", "after": m.depends_on or "",
         "recipe": f"{m.recipe.epochs} epochs, batch {m.recipe.batch_size}, {m.recipe.optimizer} "
                   f"{m.recipe.learning_rate:g}", "about": m.summary}
        for m in METHODS.values()])  # fmt: skip


@app.command()
def demo(
    folder: Annotated[
        str, typer.Option("--dir", help="Where the demo data, store and runs go.")
    ] = "wf-demo",
    images_per_class: Annotated[int, typer.Option(help="Generated images per class.")] = 40,
    shards: Annotated[int, typer.Option(help="Shards per split.")] = 4,
    weights: Annotated[str, typer.Option(help="imagenet or none.")] = "imagenet",
    epochs: Annotated[int, typer.Option(help="Epochs of every method.")] = 8,
    cache_dir: Annotated[
        str | None, typer.Option(help="Converted backbones cache. (default: ~/.cache/wf)")
    ] = None,
    verbose: Verbose = False,
    address: Address = None,
    num_cpus: NumCpus = None,
) -> None:
    """Generate a small shapes dataset and run the whole workflow on it, with no data of yours:
    extract, train-all (the blog's three methods, few epochs), summary.

    Example: wf demo --dir wf-demo
    """
    from workflows.console import extract_progress, train_progress
    from workflows.demo import DemoSettings, run_demo
    from workflows.extract import run_extract
    from workflows.train import run_train_all

    settings = DemoSettings(folder, images_per_class, shards, weights, epochs, cache_dir,
                            ClusterSettings(address, num_cpus, verbose))  # fmt: skip
    state: dict[str, Any] = {}

    def extract_step(extract_settings: Any) -> list[Any]:
        with extract_progress() as progress:
            reports = run_extract(extract_settings, progress)
        state["extract"] = extract_settings
        _report_extract(extract_settings, reports, False)
        return reports

    def train_step(train_settings: Any) -> list[Any]:
        with train_progress() as progress:
            results = run_train_all(train_settings, progress)
        state["train"] = train_settings
        return results

    result = run_demo(settings, extract_step, train_step)
    err.print(f"generated {images_per_class} images per class under {result.data}")
    _report_train(state["train"], result.results, False)


def main() -> None:
    """Entry point: every error is one line on stderr with its exit code."""
    debug = "--debug" in sys.argv[1:]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from workflows.settings import worker_env

    if "--verbose" not in sys.argv[1:]:
        from workflows.quiet import filter_native_stderr

        filter_native_stderr()
    os.environ.update(worker_env())
    # typer vendors click: its usage errors are typer._click's (no public name for them).
    from typer._click.exceptions import ClickException, NoArgsIsHelpError

    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except NoArgsIsHelpError as error:
        out.print(error.ctx.get_help() if error.ctx else "", markup=False)
        sys.exit(0)
    except ClickException as error:  # a wrong option or argument: one line, as the others
        command = error.ctx.command_path if getattr(error, "ctx", None) else "wf"
        command = command.replace("python -m workflows.cli", "wf").replace("cli.py", "wf")
        say("error", f"{error.format_message()} (see {command} --help)")
        sys.exit(error.exit_code)
    except typer.Abort:
        err.print("interrupted")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as error:  # the one place errors become messages
        cause = getattr(error, "cause", None)  # a Ray task's error carries the original
        shown = cause if isinstance(cause, WfError) else error
        if debug:
            import traceback

            traceback.print_exception(error)
        if isinstance(shown, WfError):
            say("error", " ".join(str(shown).split()))
            sys.exit(shown.exit_code)
        text = str(shown).strip().splitlines()
        say(
            "error",
            f"{type(shown).__name__}: {text[0] if text else ''} "
            "(wf --debug ... shows the traceback)",
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
