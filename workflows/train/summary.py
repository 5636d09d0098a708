"""The summary of a train-all run, beside the runs: ``summary.md`` (one row per job) and
``summary.html``, one self-contained page (no server, no internet: plots embedded, styles
inline) that a user can send to a colleague.

The page shows the numbers at a glance with the best method of each dataset marked, the Keras
blog's figures beside cats_vs_dogs, then for each job its per-class precision and recall,
learning curves and confusion matrix, the settings and stores it used, and links to its files.
"""

from __future__ import annotations

import base64
import html
from datetime import UTC, datetime
from typing import Any

from storage.errors import StoreError
from storage.runs import Artifact, JobFiles, JobMetrics, RunsLayout
from tasks.cross_validation import describe_split_agreement
from tasks.evaluation import format_accuracy
from tasks.training.job import JobResult

# Validation accuracy in the Keras blog on the same 2000/800 cats-vs-dogs split.
BLOG_REFERENCE = {"scratch": 0.80, "bottleneck": 0.90, "finetune": 0.94}
FILES = (Artifact.METRICS, Artifact.HISTORY, Artifact.SETTINGS, Artifact.CLASSES,
         Artifact.TRAINED_WEIGHTS, Artifact.INDEX)  # fmt: skip


def blog_reference(result: JobResult) -> float | None:
    return BLOG_REFERENCE.get(result.method) if result.dataset.startswith("cats_vs_dogs") else None


def cv_text(cv: dict[str, Any] | None, interval_digits: int | None = None) -> str:
    """``0.905 (0.890-0.918, n=2000)``: a cross-validated accuracy with its interval."""
    if not cv:
        return "-"
    return format_accuracy(cv["accuracy"], cv.get("interval"), cv.get("n"),
                           interval_digits=interval_digits)  # fmt: skip


def splits_text(cv: dict[str, Any] | None) -> str:
    """The labelled splits' own out-of-fold accuracies in words, and what follows when the
    validation images score differently from the training ones; empty without both splits."""
    found = (cv or {}).get("splits")
    if not found:
        return ""
    scores = describe_split_agreement(found)
    if not found["differs"]:
        return f"{scores}: within noise of each other"
    if found.get("rests_on_validation"):
        return (f"{scores}: the validation images score lower beyond noise, so what to expect on "
                "new images, the temperature and the abstention thresholds rest on them alone "
                "(check they stand for the images the model will see)")  # fmt: skip
    why = ("the validation images score higher, and the pooled numbers err on the safe side"
           if found["by_split"]["validation"]["accuracy"] > found["by_split"]["train"]["accuracy"]
           else "too few validation images to carry the numbers alone")  # fmt: skip
    return f"{scores}: they differ beyond noise; the numbers stay pooled ({why})"


# The console's summary leaves these out, in this order, until it fits the terminal.
OPTIONAL_COLUMNS = ("note", "blog", "s/epoch", "val loss", "epochs")


def summary_rows(
    results: list[JobResult], interval_digits: int | None = None
) -> list[dict[str, str]]:
    """One row per job: its validation accuracy with the 95% interval and the count, and its
    cross-validated accuracy when any job was cross-validated. ``interval_digits``: shorter
    intervals, for the console."""
    rows = []
    any_cv = any(r.cv for r in results)
    for r in results:
        reference = blog_reference(r)
        rows.append(
            {
                "dataset": r.dataset,
                "method": r.method,
                "status": r.status,
                "val accuracy (95%)": format_accuracy(
                    r.accuracy, r.accuracy_interval, r.n, interval_digits=interval_digits
                ),
                **({"cv accuracy (95%)": cv_text(r.cv, interval_digits)} if any_cv else {}),
                "val loss": f"{r.loss:.4f}" if r.loss is not None else "-",
                "blog": f"{reference:.2f}" if reference else "",
                "epochs": str(r.epochs),
                "s/epoch": f"{r.seconds_per_epoch:.2f}" if r.seconds_per_epoch else "-",
                "note": r.error,
            }
        )
    return rows


def write_summary(runs: RunsLayout, results: list[JobResult]) -> None:
    rows = summary_rows(results)
    if not rows:
        return
    columns = list(rows[0])
    markdown = ["# wf train-all summary", "", "| " + " | ".join(columns) + " |",
                "|" + "---|" * len(columns)]  # fmt: skip
    markdown += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    markdown += [
        "",
        "Accuracies: the share right, its 95% Wilson interval and the images counted (n). "
        "cv: cross-validated over train + validation, duplicates kept inside one fold.",
        "Blog: validation accuracy in the Keras blog on the same cats-vs-dogs split sizes.",
    ]
    for dataset, lines in choices(results).items():
        markdown += ["", f"## {dataset}", "", *(f"- {line}" for line in lines)]
    runs.write("summary.md", ("\n".join(markdown) + "\n").encode())
    runs.write("summary.html", render_html(runs, results).encode())


def choices(results: list[JobResult]) -> dict[str, list[str]]:
    """Per cross-validated dataset, in words: the method chosen and whether its lead over the
    next is beyond noise, and what its learning curve says about more labels."""
    out: dict[str, list[str]] = {}
    for r in results:
        choice = (r.cv or {}).get("choice")
        if not choice or choice["chosen"] != r.method:
            continue
        among = ", ".join(choice.get("among", [r.method]))
        lines = [f"chosen by {r.cv['folds']}-fold cross-validation (among {among}): {r.method}, "
                 f"{cv_text(r.cv)}"]  # fmt: skip
        if "next" in choice:
            lead = "within noise" if choice["within_noise"] else "beyond noise"
            lines.append(
                f"against {choice['next']} on the same {choice['images']} images: "
                f"{choice['only_first']} right only by {r.method}, {choice['only_second']} only "
                f"by {choice['next']} (McNemar p={choice['p_value']:.3f}: {lead})"
            )
        ensemble = choice.get("ensemble")
        if ensemble:
            lines.append(_ensemble_text(ensemble))
        if (r.cv.get("splits") or {}).get("differs"):
            lines.append(f"{r.method}: {splits_text(r.cv)}")
        curve = r.cv.get("learning_curve") or []
        if curve:
            lines.append(f"learning curve ({r.method}): {curve[-1]['verdict']}")
        out[r.dataset] = lines
    return out


def _ensemble_text(ensemble: dict) -> str:
    """One sentence: whether averaging the methods beats the best one beyond noise."""
    members, best = " and ".join(ensemble["members"]), ensemble["against"]
    low, high = ensemble["interval"]
    verdict = (f"beyond noise: the average beats {best}" if ensemble["beats_best"]
               else f"within noise of {best} alone: one model is enough")  # fmt: skip
    return (
        f"the average of {members} (calibrated): {ensemble['accuracy']:.3f} "
        f"({low:.3f}-{high:.3f}, n={ensemble['n']}); {ensemble['only_ensemble']} right only "
        f"by the average, {ensemble['only_best']} only by {best} "
        f"(McNemar p={ensemble['p_value']:.3f}: {verdict})"
    )


def _best(results: list[JobResult]) -> dict[str, str]:
    """Per dataset, the method cross-validation chose, else the one with the highest
    validation accuracy."""
    chosen = {r.dataset: r.cv["choice"]["chosen"] for r in results
              if r.cv and r.cv.get("choice")}  # fmt: skip
    best: dict[str, JobResult] = {}
    for r in results:
        if r.accuracy is not None and (
            r.dataset not in best or r.accuracy > best[r.dataset].accuracy
        ):
            best[r.dataset] = r
    return {**{dataset: r.method for dataset, r in best.items()}, **chosen}


def _read(job: JobFiles, name: str) -> Any:
    try:
        return job.read_json(name)
    except StoreError:
        return None


def _image(job: JobFiles, name: str, alt: str) -> str:
    try:
        data = job.read(name)
    except StoreError:
        return ""
    encoded = base64.b64encode(data).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _honest(metrics: JobMetrics) -> str:
    """Cross-validation's numbers for one job: accuracy with its interval and per fold, the
    calibration before and after, and the learning curve's sentence."""
    cv, abstain = metrics.cv, metrics.abstain
    declines = ""
    if abstain:
        far = (
            f" or farther than {abstain['max_distance']:.3f} from the labelled images"
            if abstain.get("max_distance") is not None
            else ""
        )
        declines = (f"<li>abstains below confidence {abstain['min_confidence']:.3f}{far} (chosen "
                    f"on {abstain['n']} {abstain['chosen_on']} images to decline "
                    f"{100 * abstain['rate']:.0f}% of them)</li>")  # fmt: skip
    if not cv:
        return f"<ul class=cv>{declines}</ul>" if declines else ""
    if metrics.members:  # an ensemble: its average's numbers, out of fold
        line = (f"cross-validated: <b>{html.escape(cv_text(cv))}</b>; {cv['only_ensemble']} right "
                f"only by the average, {cv['only_best']} only by {html.escape(cv['against'])} "
                f"(McNemar p={cv['p_value']:.3f})")  # fmt: skip
        return f"<ul class=cv><li>{line}</li>{declines}</ul>"
    folds = ", ".join(f"{a:.3f}" for a in cv["per_fold"])
    ece = metrics.ece or {}
    floor = (f"; a perfectly calibrated model would show about {ece['floor']:.3f} on these images"
             if ece.get("floor") else "")  # fmt: skip
    items = [
        f"cross-validated ({cv['folds']} folds, {cv['duplicate_groups']} duplicate groups kept "
        f"inside one fold): <b>{html.escape(cv_text(cv))}</b>; per fold {folds}"
        + (
            f"; on another {cv['prediction_n']} images like "
            f"{'the validation ones' if cv.get('prediction_from') == 'validation' else 'these'}"
            ", expect "
            f"{cv['prediction_interval'][0]:.3f}-{cv['prediction_interval'][1]:.3f}"
            if cv.get("prediction_interval")
            else ""
        ),
        *([f"by split: {html.escape(splits_text(cv))}"] if cv.get("splits") else []),
        f"calibration: temperature {metrics.temperature or 1:.3g} inside the saved model; "
        f"expected calibration error {ece.get('before', 0):.3f} before, "
        f"{ece.get('after', 0):.3f} after ({ece.get('on', 'out-of-fold')}, "
        f"{ece.get('bins', 15)} bins{floor})",
    ]
    curve = cv.get("learning_curve") or []
    if curve:
        points = ", ".join(f"{100 * p['fraction']:.0f}% {p['accuracy']:.3f}" for p in curve)
        items.append(f"learning curve: {points}: {html.escape(curve[-1]['verdict'])}")
    return "<ul class=cv>" + "".join(f"<li>{item}</li>" for item in items) + declines + "</ul>"


def _per_class(metrics: JobMetrics) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td>"
        f"<td>{v['f1']:.3f}</td><td>{v['support']}</td></tr>"
        for name, v in metrics.per_class.items()
    )
    return ("<table class=small><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>"
            f"<th>images</th></tr>{rows}</table>") if rows else ""  # fmt: skip


def _settings(settings: dict[str, Any] | None) -> str:
    if not settings:
        return ""
    recipe, options = settings.get("recipe", {}), settings.get("options", {})
    stores = ", ".join(f"{s['backbone']} ({s['input_size'][0]} px, manifest {s['manifest_id']})"
                       for s in settings.get("stores", []))  # fmt: skip
    items = [
        ("recipe", f"{recipe.get('epochs')} epochs, batch {recipe.get('batch_size')}, "
                   f"{recipe.get('optimizer')} {recipe.get('learning_rate')}"),
        ("options", ", ".join(f"{k} {v}" for k, v in options.items() if k != "policy")),
        ("stores", stores or "images only"),
        ("images", settings.get("dataset_root", "")),
    ]  # fmt: skip
    return (
        "<dl>" + "".join(f"<dt>{k}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items) + "</dl>"
    )


def _job_section(runs: RunsLayout, result: JobResult, best: bool) -> str:
    job = runs.job(result.dataset, result.method)
    try:
        metrics = job.metrics()
    except StoreError:
        metrics = JobMetrics(result.dataset, result.method)
    accuracy = html.escape(format_accuracy(metrics.accuracy, metrics.accuracy_interval, metrics.n))
    title = f"{result.dataset} / {result.method}" + (" &#9733; best" if best else "")
    if result.status not in ("done", "kept"):
        return (f'<section class="job failed"><h3>{html.escape(result.dataset)} / '
                f"{html.escape(result.method)}: {result.status}</h3>"
                f"<p>{html.escape(result.error)}</p></section>")  # fmt: skip
    headline = (f"validation accuracy <b>{accuracy}</b>, loss {metrics.loss or 0:.4f}, "
                f"{metrics.epochs} epochs (kept: {metrics.kept}, best epoch "
                f"{metrics.best_epoch}), {metrics.seconds_per_epoch} s per epoch")  # fmt: skip
    closed_form = metrics.epochs == 0 and not metrics.members  # prototype: no epochs to plot
    if metrics.members:  # an ensemble: no epochs of its own
        headline = (f"validation accuracy <b>{accuracy}</b>, loss {metrics.loss or 0:.4f}: the "
                    f"average of {html.escape(' and '.join(metrics.members))}, "
                    "calibrated")  # fmt: skip
    elif closed_form:
        headline = (f"validation accuracy <b>{accuracy}</b>, loss {metrics.loss or 0:.4f}: set "
                    "in closed form, no epochs")  # fmt: skip
    links = " ".join(
        f'<a href="{html.escape(result.dataset)}/{html.escape(result.method)}/{name}">{name}</a>'
        for name in (job.model_name, *FILES)
    )
    plots = "".join(_image(job, name, alt) for name, alt in (
        *(() if closed_form else ((Artifact.LEARNING_CURVES, "learning curves"),)),
        (Artifact.CONFUSION_MATRIX, "confusion matrix"),
        (Artifact.RELIABILITY, "reliability diagram"),
        (Artifact.LABELS_CURVE, "accuracy by labelled images"),
    ))  # fmt: skip
    return (f'<section class="job"><h3>{title}</h3><p>{headline}</p>{_honest(metrics)}'
            f"<div class=row><div>{_per_class(metrics)}{_settings(_read(job, Artifact.SETTINGS))}"
            "</div>"
            f"<div class=plots>{plots}</div></div>"
            f"<p class=files>files: {links}</p></section>")  # fmt: skip


STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} .sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:.5em 0} th,td{padding:.35em .7em;border-bottom:1px solid #ddd;
text-align:right} th:first-child,td:first-child{text-align:left} th{background:#f4f4f6}
td.best{font-weight:bold;background:#e7f6e7} td.failed{color:#b00020} td.blog{color:#666}
section.job{border:1px solid #ddd;border-radius:8px;padding:.2em 1em 1em;margin:1em 0}
section.failed{border-color:#e0a0a0;background:#fff6f6} .row{display:flex;gap:2em;flex-wrap:wrap}
.plots img{max-width:520px;width:100%;display:block;margin-bottom:.5em}
table.small td,table.small th{padding:.2em .5em} dl{display:grid;grid-template-columns:auto 1fr;
gap:.2em 1em;max-width:560px} dt{color:#666} dd{margin:0;word-break:break-all}
.files a{margin-right:.8em} span.cv{color:#555;font-size:.9em} ul.cv{margin:.2em 0 .6em}
ul.choice{background:#f4f8ff;border:1px solid #cdd9ee;border-radius:6px;padding:.5em 1.8em}
"""


def render_html(runs: RunsLayout, results: list[JobResult]) -> str:
    datasets = list(dict.fromkeys(r.dataset for r in results))
    methods = list(dict.fromkeys(r.method for r in results))
    best = _best(results)
    by_key = {(r.dataset, r.method): r for r in results}
    head = "".join(f"<th>{html.escape(m)}</th>" for m in methods)
    blog_head = (
        "<th>the blog (VGG16)</th>" if any(d.startswith("cats_vs_dogs") for d in datasets) else ""
    )
    rows = []
    for dataset in datasets:
        cells = []
        for method in methods:
            r = by_key.get((dataset, method))
            if r is None:
                cells.append("<td></td>")
            elif r.accuracy is None:
                cells.append(f"<td class=failed>{html.escape(r.status)}</td>")
            else:
                css = " class=best" if best.get(dataset) == method else ""
                shown = html.escape(format_accuracy(r.accuracy, r.accuracy_interval, r.n))
                if r.cv:
                    shown += f"<br><span class=cv>cv {html.escape(cv_text(r.cv))}</span>"
                cells.append(f"<td{css}>{shown}</td>")
        if blog_head:
            references = [f"{m} {BLOG_REFERENCE[m]:.2f}" for m in methods if m in BLOG_REFERENCE]
            blog = ", ".join(references) if dataset.startswith("cats_vs_dogs") else ""
            cells.append(f"<td class=blog>{blog}</td>")
        rows.append(f"<tr><td>{html.escape(dataset)}</td>{''.join(cells)}</tr>")
    chosen = choices(results)
    sections = "".join(
        f"<h2>{html.escape(dataset)}</h2>"
        + (
            "<ul class=choice>"
            + "".join(f"<li>{html.escape(line)}</li>" for line in chosen[dataset])
            + "</ul>"
            if dataset in chosen
            else ""
        )
        + "".join(
            _job_section(runs, r, best.get(dataset) == r.method)
            for r in results
            if r.dataset == dataset
        )
        for dataset in datasets
    )
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!doctype html><html lang=en><meta charset=utf-8><title>wf report</title>"
        f"<style>{STYLE}</style><h1>wf report</h1><p class=sub>{html.escape(runs.location.uri)}, "
        f"{stamp}: validation accuracy of every job with its 95% interval and image count (n), "
        "and the cross-validated accuracy (cv) where it ran; the method chosen for each "
        "dataset is marked.</p>"
        f"<table><tr><th>dataset</th>{head}{blog_head}</tr>{''.join(rows)}</table>{sections}</html>"
    )
