"""`wf stores` and `wf runs`: what a store or a runs folder holds, without browsing folders."""

from __future__ import annotations

from typing import Any

from storage.errors import StoreError
from storage.feature_store import FeatureStore
from storage.layout import StoreLayout
from storage.runs import RunsLayout
from tasks.evaluation import format_accuracy


def list_stores(store: str) -> list[dict[str, Any]]:
    """One entry per (dataset, backbone): classes, images and rows by split, rejects, size."""
    layout = StoreLayout.at(store)
    entries = []
    for dataset, backbone in layout.stores():
        try:
            manifest = FeatureStore.open(layout, dataset, backbone).manifest
        except StoreError as error:
            entries.append({"dataset": dataset, "backbone": backbone, "problem": str(error)})
            continue
        records = manifest.shards.values()
        splits = sorted(manifest.split_sizes)
        entries.append({
            "dataset": dataset,
            "backbone": backbone,
            "classes": len(manifest.classes),
            "images": {s: manifest.images_in(s) for s in splits},
            "rows": sum(r.rows for r in records),
            "rejects": len(manifest.rejects),
            "shards": f"{len(manifest.shards)}/{len(manifest.expected_keys())}",
            "bytes": sum(r.size_bytes for r in records),
            "augment": manifest.augment_copies,
            "runtime": manifest.runtime,
            "updated": manifest.updated_at,
        })  # fmt: skip
    return entries


def list_runs(runs: str) -> list[dict[str, Any]]:
    """One entry per finished job: accuracy, loss, epochs, seconds per epoch, when, model size."""
    layout = RunsLayout(runs)
    entries = []
    for job in layout.jobs():
        try:
            metrics = job.metrics()
            index = job.index()
        except StoreError as error:
            entries.append({"dataset": job.dataset, "method": job.method, "problem": str(error)})
            continue
        entries.append({
            "dataset": job.dataset,
            "method": job.method,
            "accuracy": metrics.accuracy,
            "n": metrics.n,
            "accuracy_interval": metrics.accuracy_interval,
            "cv": {k: metrics.cv[k] for k in ("folds", "accuracy", "interval", "n")}
            if metrics.cv else None,
            "loss": metrics.loss,
            "epochs": metrics.epochs,
            "seconds_per_epoch": metrics.seconds_per_epoch,
            "finished": metrics.finished_at,
            "model_bytes": index.get(job.model_name, {}).get("bytes"),
            "model": job.display(job.model_name),
        })  # fmt: skip
    return entries


def shown_runs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`list_runs`'s entries for the table: each accuracy with its interval and count."""
    out = []
    for entry in entries:
        if "problem" in entry:
            out.append(entry)
            continue
        shown = {k: v for k, v in entry.items() if k not in ("n", "accuracy_interval", "cv")}
        shown["accuracy"] = format_accuracy(entry["accuracy"], entry["accuracy_interval"],
                                            entry["n"])  # fmt: skip
        cv = entry["cv"]
        shown = {**dict(list(shown.items())[:3]),
                 "cv accuracy": format_accuracy(cv["accuracy"], cv["interval"], cv["n"])
                 if cv else "-", **dict(list(shown.items())[3:])}  # fmt: skip
        out.append(shown)
    return out
