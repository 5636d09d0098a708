"""What people see: progress bars, and tables that never cut a name.

A table wider than the terminal (an 80-column window, a CI log, a pipe) is printed as one block
of ``key: value`` lines per row instead of being truncated; ``--json`` prints the same facts as
one JSON document on stdout for scripts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich import box
from rich.console import Console
from rich.live import Live
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def say(kind: str, message: str, style: str = "red") -> None:
    """One line on stderr: ``kind:`` in colour, then the message exactly as it is (no markup)."""
    err.print(Text.assemble((f"{kind}: ", style), message), soft_wrap=True)


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError  # pragma: no cover


def _table(title: str, columns: list[str], rows: list[dict[str, str]], compact: bool) -> Table:
    # Compact: no borders, one space between columns beside the divider (fits 80 columns).
    style: dict[str, Any] = {}
    if compact:
        style = {"box": box.SIMPLE_HEAD, "show_edge": False, "pad_edge": False,
                 "padding": (0, 1, 0, 0)}  # fmt: skip
    table = Table(title=title, **style)
    for column in columns:
        table.add_column(column, no_wrap=True, overflow="ignore")
    for row in rows:
        table.add_row(*(Text(str(row.get(c, ""))) for c in columns))
    return table


def print_table(
    title: str, rows: list[dict[str, str]], console: Console = out,
    optional: tuple[str, ...] = (), whole: str = "",
) -> None:  # fmt: skip
    """A table when it fits the console's width (boxed, else without borders, else without the
    ``optional`` columns, left out in their order and named with where the ``whole`` table
    is), else one ``key: value`` block per row. Columns empty in every row are left out."""
    if not rows:
        console.print(f"{title}: nothing")
        return
    columns = [c for c in rows[0] if any(str(r.get(c, "")) != "" for r in rows)]
    unlimited = console.options.update(max_width=100_000)
    for dropped in range(len([c for c in optional if c in columns]) + 1):
        left_out = [c for c in optional if c in columns][:dropped]
        shown = [c for c in columns if c not in left_out]
        for compact in (False, True):
            table = _table(title, shown, rows, compact)
            if Measurement.get(console, unlimited, table).maximum <= console.width:
                console.print(table)
                if left_out:
                    where = f"in {whole}" if whole else "left out"
                    console.print(f"(also {where}: {', '.join(left_out)})", markup=False)
                return
    console.print(Text(title, style="bold"))
    for row in rows:
        first, *rest = columns
        console.print(Text(f"{first}: {row.get(first, '')}", style="bold"))
        for column in rest:
            if str(row.get(column, "")) != "":
                console.print(Text(f"  {column}: {row.get(column, '')}"))


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


@contextmanager
def extract_progress(
    enabled: bool = True,
) -> Iterator[Callable[[dict[str, tuple[int, int, int]]], None] | None]:
    """A progress bar per dataset; yields the hook that ``run_extract`` calls (None when
    disabled: then the run keeps no progress counter at all)."""
    if not enabled:
        yield None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:>6.1f} img/s  rejects {task.fields[rejects]}"),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=err, transient=False) as progress:
        bars: dict[str, Any] = {}
        started = time.perf_counter()

        def update(totals: dict[str, tuple[int, int, int]]) -> None:
            elapsed = max(time.perf_counter() - started, 1e-9)
            for name, (done, planned, rejects) in totals.items():
                if name not in bars:
                    bars[name] = progress.add_task(name, total=planned, rate=0.0, rejects=0)
                progress.update(
                    bars[name], completed=done + rejects, rate=done / elapsed, rejects=rejects
                )

        yield update


@contextmanager
def train_progress(enabled: bool = True) -> Iterator[Callable[[dict[str, dict]], None]]:
    """A live table of jobs: state and epochs; yields the hook train-all calls."""
    if not enabled:
        yield lambda status: None
        return
    colours = {
        "running": "cyan",
        "cross-validating": "magenta",
        "done": "green",
        "kept": "green",
        "failed": "red",
        "skipped": "yellow",
    }

    def render(status: dict[str, dict]) -> Table:
        table = Table(title="wf train-all: jobs")
        for column in ("job", "state", "epoch"):
            table.add_column(column, no_wrap=True)
        for key, job in status.items():
            colour = colours.get(job["state"], "white")
            table.add_row(key, f"[{colour}]{job['state']}[/]", f"{job['epoch']}/{job['epochs']}")
        return table

    with Live(Table(title="wf train-all: starting"), console=err, refresh_per_second=2) as live:
        yield lambda status: live.update(render(status))
    err.print()  # a blank line between the live table's last border and what comes next


def show_extract(title: str, reports: list[Any], as_json: bool) -> None:
    """The extract table (or JSON), then each warning, failure and rejects file."""
    from dataclasses import asdict

    if as_json:
        print_json([asdict(r) for r in reports])
    else:
        print_table(title, [
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


def show_train(runs: str, results: list[Any], as_json: bool) -> None:
    from dataclasses import asdict

    from workflows.train.summary import summary_rows

    if as_json:
        print_json([asdict(r) for r in results])
    else:
        from workflows.train.summary import OPTIONAL_COLUMNS

        print_table(f"wf train-all: {runs}", summary_rows(results, interval_digits=2),
                    optional=OPTIONAL_COLUMNS, whole="summary.md")  # fmt: skip
        out.print(f"summary: {runs.rstrip('/')}/summary.md and summary.html", markup=False)
    for result in results:
        if result.status == "failed":
            say("failed", f"{result.key}: {result.error}")


def show_evaluation(folder: str, metrics: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(metrics)
        return
    print_table(f"wf evaluate: {folder}", [
        {"class": name, **{k: str(v[k]) for k in ("precision", "recall", "f1", "support")}}
        for name, v in metrics["per_class"].items()])  # fmt: skip
    from tasks.evaluation import accuracy_text

    # A cross-entropy is never below zero: -0.0 (or float noise) would print "-0.0000".
    out.print(f"accuracy {accuracy_text(metrics)}  loss {max(0.0, metrics['loss']):.4f}  "
              f"rejected {len(metrics['rejects'])}", markup=False)  # fmt: skip
    expected = metrics.get("expected")
    if expected:
        low, high = expected["interval"]
        if expected["within"]:
            verdict = "within it"
        elif metrics["accuracy"] > high:
            verdict = "above it: did the model train on these images, or are they easier?"
        else:
            verdict = ("below it: these images differ from the labelled ones (another source, "
                       "time or labeller), or the model does")  # fmt: skip
        basis = "its validation images" if expected.get("from") == "validation" else "images"
        out.print(f"cross-validation ({expected['accuracy']:.3f} on {expected['cv_n']} {basis}) "
                  f"expected {low:.3f}-{high:.3f} on {expected['n']} images like these: "
                  f"{verdict}", markup=False)  # fmt: skip
    answered = metrics.get("answered") or {}
    if answered.get("thresholds"):
        out.print(f"answered {answered['n']} of {metrics['n']} (coverage "
                  f"{answered['coverage']:.3f}): accuracy {accuracy_text(answered)}",
                  markup=False)  # fmt: skip
        declined = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in answered["abstained"].items())
        out.print(f"declined: {declined}", markup=False)


def show_export(report: Any, as_json: bool) -> None:
    """``wf export``: the parity gate's numbers, and whether the file was written."""
    if as_json:
        print_json(report.to_json())
        return
    print_table(f"wf export: {report.format} -> {report.output}", [{
        "images": str(report.images), "top-1 agreement": f"{report.agreement:.4f}",
        "max prob diff": f"{report.max_probability_difference:.2e}",
        "accuracy keras": f"{report.keras_accuracy:.4f}",
        "accuracy exported": f"{report.exported_accuracy:.4f}",
        "worst class": f"{report.worst_class} {-report.worst_class_drop * 100 + 0.0:+.1f} pts",
    }])  # fmt: skip
    if report.written:
        out.print(f"written: {report.output} ({report.bytes:,} bytes)", markup=False)


def show_registries(backbones: bool) -> None:
    """``wf backbones`` or ``wf methods``: the registry as a table."""
    if backbones:
        from tasks.backbones import BACKBONES, DEFAULT_BACKBONE, TAP_DESCRIPTIONS

        print_table("wf backbones", [
            {"name": f"{b.name} (default)" if b.name == DEFAULT_BACKBONE else b.name,
             "input": f"{b.default_input_size}px", "taps": ", ".join(b.taps),
             "offline ImageNet": "yes" if b.offline_imagenet else "no", "about": b.summary}
            for b in BACKBONES.values()])  # fmt: skip
        for tap, text in TAP_DESCRIPTIONS.items():
            out.print(f"  {tap}: {text}")
        out.print(
            "  Your own ONNX model: --backbone onnx:PATH_OR_URI, with PATH_OR_URI.json beside "
            'it, e.g. {"name": "dinov2_s", "input_size": [224, 224], "layout": "NCHW", '
            '"scale": 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], '
            '"output": "tokens", "pool": "cls+mean"} (pool: none, mean, cls, cls+mean); '
            "it has the bottleneck tap and trains with bottleneck, prototype and fusion "
            "(README: Your own ONNX backbone)",
            markup=False,
            soft_wrap=True,
        )
        return
    from tasks.methods import DEFAULT_METHODS, METHODS

    print_table("wf methods", [
        {"name": m.name, "default": "yes" if m.name in DEFAULT_METHODS else "no",
         "reads": ", ".join(m.taps) or "images", "after": m.depends_on or "",
         "recipe": f"{m.recipe.epochs} epochs, batch {m.recipe.batch_size}, {m.recipe.optimizer} "
                   f"{m.recipe.learning_rate:g}",
         "options": ", ".join(o.flag for o in m.options), "about": m.summary}
        for m in METHODS.values()])  # fmt: skip


def show_listing(title: str, entries: list[dict[str, Any]], as_json: bool) -> None:
    """``wf stores`` / ``wf runs``: one row per entry (sizes in people's units)."""
    if as_json:
        print_json(entries)
        return

    def cell(key: str, value: Any) -> str:
        if value is None:
            return "-"
        if key.endswith("bytes"):
            return human_bytes(value)
        if isinstance(value, float):
            return f"{value:.4f}"
        if isinstance(value, dict):
            return " ".join(f"{k} {v}" for k, v in value.items())
        return str(value)

    print_table(title, [{k.replace("_", " "): cell(k, v) for k, v in e.items()} for e in entries])


def show_next_steps(runs: str) -> None:
    """What the demo made and what to try next, on the user's own data."""
    model = f"{runs}/shapes/finetune/model.keras"
    lines = [
        f"report: {runs}/summary.html (one file: open it in a browser)",
        "next, on your own images (one folder per class):",
        "  wf extract data/my_dataset --store store",
        "  wf audit --store store   (duplicates, leaks across splits, label errors)",
        "  wf train-all --store store --runs runs",
        f"  wf predict {model} some_photos/",
        "  wf stores store; wf runs runs; wf --help",
        "serve these models, then ask one from another terminal:",
        f"  wf serve --runs {runs}",
        f"  curl --data-binary @{runs.rsplit('/', 1)[0]}/data/shapes/circles/"
        "circles_0000.jpg http://127.0.0.1:8000/v1/models/shapes/finetune:predict",
    ]
    for line in lines:  # a command is one line, however long: it must paste whole
        out.print(line, markup=False, highlight=False, soft_wrap=line.startswith("  "))


def show_serving(url: str, models: list[Any]) -> None:
    """Where `wf serve` listens, its models, and a request to try."""
    out.print(f"serving {len(models)} models at {url} (Ctrl-C stops)", markup=False)
    for served in models:
        out.print(f"  POST {url}/v1/models/{served.dataset}/{served.method}:predict"
                  f"   ({', '.join(served.classes)})", markup=False, highlight=False)  # fmt: skip
    first = models[0]
    out.print("try:", markup=False)
    out.print(f"  curl --data-binary @photo.jpg {url}/v1/models/{first.dataset}/"
              f"{first.method}:predict", markup=False, highlight=False, soft_wrap=True)  # fmt: skip


def show_verify(report: Any) -> None:
    for problem in report.problems:
        say("mismatch", problem)
    problems = len(report.problems) or "no"
    out.print(f"checked {report.checked} files ({human_bytes(report.bytes)}): {problems} problems")


def show_error(error: BaseException, debug: bool) -> int:
    """One line for any error (the traceback too with ``debug``); returns the exit code: the
    error's own for a :class:`WfError` (2 bad input, 1 failed run), else 1."""
    from storage.errors import WfError

    cause = getattr(error, "cause", None)  # a Ray task's error carries the original
    shown = cause if isinstance(cause, WfError) else error
    if debug:
        import traceback

        traceback.print_exception(error)
    if isinstance(shown, WfError):
        say("error", " ".join(str(shown).split()))
        return shown.exit_code
    text = str(shown).strip().splitlines()
    say("error", f"{type(shown).__name__}: {text[0] if text else ''} "
                 "(wf --debug ... shows the traceback)")  # fmt: skip
    return 1


def show_audit(output: str, summaries: dict[str, dict], as_json: bool) -> None:
    if as_json:
        print_json(summaries)
        return
    from workflows.audit.settings import ISSUES

    rows = [{"dataset": d, "images": str(s["images"]),
             **{k.replace("_", " "): str(s["counts"].get(k, 0)) for k in ISSUES}}
            for d, s in summaries.items()]  # fmt: skip
    print_table(f"wf audit: {output}", rows)
    for dataset, summary in summaries.items():
        out.print(
            f"{dataset}: {output.rstrip('/')}/{dataset}/report.html and issues.csv", markup=False
        )
        if (summary.get("splits") or {}).get("differs"):
            from tasks.cross_validation import describe_split_agreement

            say("warning", f"{dataset}: the validation folder is unlike the training folder: "
                f"{describe_split_agreement(summary['splits'])}")  # fmt: skip


def show_suggest(output: str, summaries: dict[str, dict], as_json: bool) -> None:
    if as_json:
        print_json(summaries)
        return
    rows = [{"dataset": d, "unlabelled": str(s["unlabelled"]), "suggested": str(s["suggested"]),
             **{r: str(n) for r, n in s["reasons"].items()}}
            for d, s in summaries.items()]  # fmt: skip
    print_table(f"wf suggest: {output}", rows)
    for summary in summaries.values():
        for warning in summary["warnings"]:
            say("warning", warning)
        out.print(f"{summary['dataset']}: {summary['csv']} and {summary['report']}", markup=False)
    out.print("next: label them (class folders, or `wf label DATASET labels.csv`), then "
              "`wf extract` and `wf train-all`", markup=False)  # fmt: skip


def show_label(dataset: str, report: Any, as_json: bool) -> None:
    if as_json:
        print_json({"moved": report.moved, "problems": report.problems, "log": report.log})
        return
    for problem in report.problems:
        say("error", problem)
    out.print(f"wf label: moved {len(report.moved)} images in {dataset}; log {report.log}",
              markup=False)  # fmt: skip
    if report.moved:
        out.print("next: `wf extract` (only the shards they touched) and `wf train-all`",
                  markup=False)  # fmt: skip
