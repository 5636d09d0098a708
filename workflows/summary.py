"""The summary of a train-all run: one row per job, as Markdown and HTML beside the runs."""

from __future__ import annotations

import html

from storage.filesystem import file_info
from storage.runs import RunsLayout
from tasks.training.job import JobResult

# Validation accuracy in the Keras blog on the same 2000/800 cats-vs-dogs split.
BLOG_REFERENCE = {"scratch": 0.80, "bottleneck": 0.90, "finetune": 0.94}


def summary_rows(results: list[JobResult]) -> list[dict[str, str]]:
    rows = []
    for r in results:
        reference = BLOG_REFERENCE.get(r.method) if r.dataset.startswith("cats_vs_dogs") else None
        rows.append(
            {
                "dataset": r.dataset,
                "method": r.method,
                "status": r.status,
                "val accuracy": f"{r.accuracy:.4f}" if r.accuracy is not None else "-",
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
        "Blog: validation accuracy in the Keras blog on the same cats-vs-dogs split sizes.",
    ]
    runs.write("summary.md", ("\n".join(markdown) + "\n").encode())
    cells = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for result, row in zip(results, rows, strict=True):
        body.append("<tr>" + "".join(f"<td>{html.escape(row[c])}</td>" for c in columns) + "</tr>")
        job = runs.job(result.dataset, result.method)
        folder = f"{html.escape(result.dataset)}/{html.escape(result.method)}"
        plots = [
            f'<img src="{folder}/{name}" height="240">'
            for name in ("learning_curves.png", "confusion_matrix.png")
            if file_info(runs.location.filesystem, job.path(name))
        ]
        if plots:
            body.append(f'<tr><td colspan="{len(columns)}">{"".join(plots)}</td></tr>')
    page = (
        "<!doctype html><meta charset=utf-8><title>wf summary</title><h1>wf train-all summary</h1>"
        f"<table border=1 cellpadding=4><tr>{cells}</tr>{''.join(body)}</table>"
    )
    runs.write("summary.html", page.encode())
