"""The training pipeline: every (dataset, method) job of a feature store, concurrently.

plan jobs -> start each job as a Ray task that drives its own Ray Train run, as many at once as
the cluster's CPUs allow (``finetune`` only after its dataset's ``bottleneck`` top exists) ->
collect results -> summary table (Markdown and HTML beside the runs).
"""

from __future__ import annotations

import html
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray

from storage.artifacts import JobFiles, read_json, write_bytes
from storage.errors import StoreError
from storage.layout import StoreLayout
from tasks.backbones import DEFAULT_BACKBONE, get_backbone, resolve_weights
from tasks.training import JobBoard, JobResult, JobSpec, run_job_task
from workflows.cluster import ray_cluster
from workflows.settings import TrainSettings

# Validation accuracy in the Keras blog on the same 2000/800 cats-vs-dogs split.
BLOG_REFERENCE = {"scratch": 0.80, "bottleneck": 0.90, "finetune": 0.94}
METHOD_ORDER = ("bottleneck", "finetune", "scratch")


@dataclass(frozen=True)
class PlannedJob:
    spec: JobSpec
    depends_on: str | None


def _pick_backbone(layout: StoreLayout, dataset: str, wanted: str | None) -> str | None:
    backbones = [b for d, b in layout.datasets() if d == dataset]
    if wanted:
        return wanted if wanted in backbones else None
    if DEFAULT_BACKBONE in backbones:
        return DEFAULT_BACKBONE
    return backbones[0] if backbones else None


def plan_jobs(settings: TrainSettings) -> list[PlannedJob]:
    """Every selected (dataset, method) job, bottleneck before finetune."""
    layout = StoreLayout.at(settings.store)
    available = sorted({d for d, _ in layout.datasets()})
    if not available:
        raise StoreError(f"no feature store under {settings.store}: run `wf extract` first")
    chosen = list(settings.datasets) if settings.datasets else available
    missing = [d for d in chosen if d not in available]
    if missing:
        raise StoreError(
            f"not in {settings.store}: {', '.join(missing)}; it has {', '.join(available)}"
        )
    jobs = []
    for dataset in chosen:
        backbone = _pick_backbone(layout, dataset, settings.backbone)
        if backbone is None:
            raise StoreError(f"{dataset} has no store for backbone {settings.backbone}")
        for method in METHOD_ORDER:
            if method not in settings.methods:
                continue
            method_settings = settings.method_settings[method]
            spec = JobSpec(
                dataset=dataset,
                method=method,
                store=settings.store,
                runs=settings.runs,
                backbone=backbone,
                epochs=method_settings.epochs,
                batch_size=method_settings.batch_size,
                learning_rate=method_settings.learning_rate,
                optimizer=method_settings.optimizer,
                momentum=method_settings.momentum,
                workers=settings.workers,
                threads=settings.threads_per_worker,
                use_gpu=settings.use_gpu,
                early_stopping_patience=settings.early_stopping_patience,
                keep_best=settings.keep_best,
                epoch_copies=settings.epoch_copies,
                seed=settings.seed,
                scratch_image_size=settings.scratch_image_size,
                max_failures=settings.max_failures,
            )
            depends = f"{dataset}/bottleneck" if method == "finetune" else None
            jobs.append(PlannedJob(spec, depends))
    return jobs


ProgressHook = Callable[[dict[str, dict]], None]


def run_train_all(
    settings: TrainSettings, on_progress: ProgressHook | None = None
) -> list[JobResult]:
    """Run every planned job; one failed job is reported and does not stop the others."""
    jobs = plan_jobs(settings)
    if settings.force:
        import shutil

        for job in jobs:
            shutil.rmtree(
                JobFiles(settings.runs, job.spec.dataset, job.spec.method).dir, ignore_errors=True
            )
            shutil.rmtree(
                os.path.join(os.path.abspath(settings.runs), "_ray", job.spec.run_name),
                ignore_errors=True,
            )
    weights = {}
    for job in jobs:
        if job.spec.method != "scratch" and job.spec.backbone not in weights:
            manifest_source = _manifest_weights(settings.store, job.spec.dataset, job.spec.backbone)
            weights[job.spec.backbone] = resolve_weights(
                get_backbone(job.spec.backbone), manifest_source
            )
    results: dict[str, JobResult] = {}
    with ray_cluster(settings.cluster):
        cpus = int(ray.cluster_resources().get("CPU", 1))
        per_job = settings.workers * settings.threads_per_worker
        limit = settings.max_concurrent_jobs or max(1, cpus // per_job)
        board = JobBoard.remote()
        waiting = list(jobs)
        planned = {job.spec.key for job in jobs}
        running: dict[ray.ObjectRef, tuple[PlannedJob, float]] = {}
        while waiting or running:
            for job in list(waiting):
                if len(running) >= limit:
                    break
                if job.depends_on in planned and job.depends_on not in results:
                    continue  # its bottleneck top is not there yet
                waiting.remove(job)
                dependency = results.get(job.depends_on) if job.depends_on else None
                files = JobFiles(settings.runs, job.spec.dataset, job.spec.method)
                top = JobFiles(settings.runs, job.spec.dataset, "bottleneck")
                if (
                    job.depends_on
                    and not (dependency and dependency.status == "done")
                    and not top.exists()
                ):
                    results[job.spec.key] = JobResult(
                        job.spec.dataset,
                        job.spec.method,
                        "skipped",
                        error=f"{job.depends_on} did not finish",
                    )
                elif files.exists() and not settings.force:
                    results[job.spec.key] = _existing_result(job.spec, files)
                else:
                    ref = run_job_task.remote(job.spec, board, weights.get(job.spec.backbone))
                    running[ref] = (job, time.perf_counter())
            if not running:
                continue
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                job, started = running.pop(ref)
                try:
                    results[job.spec.key] = ray.get(ref)
                except Exception as error:  # a failed job is reported, the others go on
                    message = str(error).strip().splitlines()
                    results[job.spec.key] = JobResult(
                        job.spec.dataset,
                        job.spec.method,
                        "failed",
                        seconds=time.perf_counter() - started,
                        error=f"{type(error).__name__}: {message[-1] if message else ''}"[:500],
                    )
            if on_progress is not None:
                facts = ray.get(board.all.remote())
                status = {}
                for job in jobs:
                    key = job.spec.key
                    if key in results:
                        status[key] = {
                            "state": results[key].status,
                            "epochs": job.spec.epochs,
                            "epoch": results[key].epochs,
                        }
                    elif any(j.spec.key == key for j, _ in running.values()):
                        status[key] = {
                            "state": "running",
                            "epochs": job.spec.epochs,
                            "epoch": facts.get(key, {}).get("epoch", 0),
                        }
                    else:
                        status[key] = {"state": "waiting", "epochs": job.spec.epochs, "epoch": 0}
                on_progress(status)
    ordered = [results[job.spec.key] for job in jobs]
    write_summary(settings.runs, ordered)
    return ordered


def _manifest_weights(store: str, dataset: str, backbone: str) -> str:
    from storage.feature_store import FeatureStore

    return FeatureStore.open(store, dataset, backbone).manifest.weights_source


def _existing_result(spec: JobSpec, files: JobFiles) -> JobResult:
    metrics = read_json(files.path("metrics.json"))
    return JobResult(
        spec.dataset,
        spec.method,
        "done",
        accuracy=metrics.get("accuracy"),
        loss=metrics.get("loss"),
        epochs=metrics.get("epochs", 0),
        seconds=0.0,
        seconds_per_epoch=metrics.get("seconds_per_epoch"),
        workers_in_sync=metrics.get("workers_in_sync"),
        model_path=files.model,
        error="kept (exists)",
    )


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


def write_summary(runs: str, results: list[JobResult]) -> None:
    rows = summary_rows(results)
    if not rows:
        return
    columns = list(rows[0])
    markdown = [
        "# wf train-all summary",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    markdown += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    markdown.append("")
    markdown.append(
        "Blog: validation accuracy in the Keras blog on the same cats-vs-dogs split sizes."
    )
    write_bytes(os.path.join(runs, "summary.md"), ("\n".join(markdown) + "\n").encode())
    cells = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for result, row in zip(results, rows, strict=True):
        body.append("<tr>" + "".join(f"<td>{html.escape(row[c])}</td>" for c in columns) + "</tr>")
        plots = [
            f'<img src="{result.dataset}/{result.method}/{name}" height="240">'
            for name in ("learning_curves.png", "confusion_matrix.png")
            if os.path.exists(os.path.join(runs, result.dataset, result.method, name))
        ]
        if plots:
            body.append(f'<tr><td colspan="{len(columns)}">{"".join(plots)}</td></tr>')
    page = (
        f"<!doctype html><meta charset=utf-8><title>wf summary</title><h1>wf train-all summary</h1>"
        f"<table border=1 cellpadding=4><tr>{cells}</tr>{''.join(body)}</table>"
    )
    write_bytes(os.path.join(runs, "summary.html"), page.encode())
