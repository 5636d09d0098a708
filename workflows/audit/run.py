"""`wf audit`: duplicates, leakage across splits, outliers and label errors, found from a
feature store's stored embeddings and image ids (copy 0 of each image); no image is decoded
again except to draw the report's thumbnails.

For each dataset, under ``<output>/<dataset>/``: ``issues.csv`` and ``issues.parquet`` (one row
per flagged image: ``issue``, ``path``, ``split``, ``label``, ``score``, ``group``,
``suggested_label``, ``keep``), ``summary.json`` (counts, thresholds, timings), ``report.html``
(thumbnails of every group and label issue), and with ``resplit`` a group-aware split proposal,
``resplit.csv``. Nothing in the dataset is moved.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from storage.errors import RunFailed, SettingsError, StoreError
from storage.feature_store import FeatureStore, tap_column, tap_to_numpy
from storage.filesystem import Location, table_bytes, write_bytes
from storage.layout import StoreLayout
from tasks.audit import (
    Neighbours,
    groups,
    near_pairs,
    nearest,
    neighbour_votes,
    normalise,
    outlier_scores,
    relative_scale,
)
from tasks.cross_validation import split_agreement
from workflows.audit.settings import AuditSettings
from workflows.datasets import SPLITS as LABELLED_SPLITS


@dataclass
class Images:
    """The audited images (copy 0 of every split), in one order."""

    path: list[str]
    split: list[str]
    label: list[str]
    label_index: np.ndarray
    image_id: list[str]
    embedding: np.ndarray


def load_images(store: FeatureStore) -> Images:
    columns = ["path", "split", "label", "label_index", "image_id", tap_column("bottleneck")]
    table = pa.concat_tables([store.read_table(s, columns, first_copy_only=True)
                              for s in LABELLED_SPLITS if store.manifest.files(s)])  # fmt: skip
    shape = store.manifest.taps["bottleneck"].shape
    return Images(table["path"].to_pylist(), table["split"].to_pylist(), table["label"].to_pylist(),
                  table["label_index"].to_numpy(), table["image_id"].to_pylist(),
                  normalise(tap_to_numpy(table[tap_column("bottleneck")], shape)))  # fmt: skip


def _keep(members: list[int], images: Images, sizes: dict[str, int]) -> int:
    """The one image of a duplicate group to keep: the largest file, then the first path."""
    return min(members, key=lambda i: (-sizes.get(images.path[i], 0), images.path[i]))


def duplicate_pairs(
    images: Images, neighbours: Neighbours, settings: AuditSettings
) -> tuple[dict[str, list[int]], list[tuple[int, int]], list[tuple[int, int, float]]]:
    """The images by content id, the pairs of exact duplicates (the same bytes) and the near
    pairs ``(i, j, cosine)`` (closer than the settings' thresholds, different bytes)."""
    by_id: dict[str, list[int]] = {}
    for i, image_id in enumerate(images.image_id):
        by_id.setdefault(image_id, []).append(i)
    exact = [(m[0], j) for m in by_id.values() if len(m) > 1 for j in m[1:]]
    near = [] if settings.exact_only else [
        (i, j, s) for i, j, s in near_pairs(neighbours, settings.similarity, settings.relative)
        if images.image_id[i] != images.image_id[j]]  # fmt: skip
    return by_id, exact, near


def duplicate_groups(images: Images, settings: AuditSettings | None = None) -> list[list[int]]:
    """The groups of images that are exact or near duplicates of one another, as `wf audit`
    finds them (its default thresholds): what cross-validation keeps inside one fold."""
    settings = settings or AuditSettings()
    if len(images.path) < 2:
        return []
    neighbours = nearest(images.embedding, settings.neighbours)
    _, exact, near = duplicate_pairs(images, neighbours, settings)
    return groups(len(images.path), exact + [(i, j) for i, j, _ in near])


def audit_images(
    images: Images, classes: tuple[str, ...], settings: AuditSettings, sizes: dict[str, int],
    out_of_fold: Any = None,
) -> tuple[list[dict], dict]:  # fmt: skip
    """Every issue of one dataset's images, and the summary of the audit (thresholds, counts).
    ``out_of_fold``: the labelled images' out-of-fold probabilities
    (:class:`workflows.train.cross_validate.OutOfFold`); without them, no label issues."""
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(stage: str) -> None:
        timings[stage] = round(time.perf_counter() - started - sum(timings.values()), 3)

    neighbours = nearest(images.embedding, settings.neighbours)
    lap("neighbours")
    by_id, exact, near = duplicate_pairs(images, neighbours, settings)
    closest: dict[int, float] = {}  # each image's highest similarity in a near pair
    for i, j, similarity in near:
        for k in (i, j):
            closest[k] = max(closest.get(k, 0.0), similarity)
    issues: list[dict] = []

    def add(issue: str, i: int, score: float, group: int | None = None, **extra: object) -> None:
        issues.append({"issue": issue, "path": images.path[i], "split": images.split[i],
                       "label": images.label[i], "score": round(float(score), 6), "group": group,
                       "suggested_label": None, "keep": None, **extra})  # fmt: skip

    for number, members in enumerate(
        groups(len(images.path), exact + [(i, j) for i, j, _ in near])
    ):
        kept = _keep(members, images, sizes)
        same_bytes = len({images.image_id[i] for i in members}) == 1
        for i in members:
            score = 1.0 if same_bytes else closest.get(i, 1.0)  # a pair never spans two groups
            kind = (
                "exact_duplicate"
                if same_bytes or len(by_id[images.image_id[i]]) > 1
                else "near_duplicate"
            )
            add(kind, i, score, number, keep=i == kept)
        if len({images.split[i] for i in members}) > 1:
            for i in members:
                add("leakage", i, 1.0, number, keep=i == kept)
        if len({images.label[i] for i in members}) > 1:
            for i in members:
                add("conflicting_labels", i, 1.0, number, keep=i == kept)
    lap("duplicates")
    scores = outlier_scores(neighbours, images.embedding, images.label_index)
    for i in np.nonzero(scores >= settings.outlier_score)[0]:
        add("outlier", int(i), scores[i])
    lap("outliers")
    train = np.array([i for i, s in enumerate(images.split) if s == "train"])
    flagged = _label_issues(images, train, neighbours, classes, out_of_fold)
    for i, score, suggested in flagged:
        add("label_issue", i, score, suggested_label=classes[suggested])
    lap("label_issues")
    summary = {
        "images": len(images.path), "counts": dict(Counter(i["issue"] for i in issues)),
        "thresholds": {"similarity": settings.similarity, "relative": settings.relative,
                       "relative_distance": round(settings.relative * relative_scale(neighbours), 6)
                       if settings.relative is not None else None,
                       "outlier_score": settings.outlier_score, "neighbours": settings.neighbours,
                       "exact_only": settings.exact_only},
        "seconds": round(time.perf_counter() - started, 3), "timings": timings,
    }  # fmt: skip
    return issues, summary


def _label_issues(
    images: Images, train: np.ndarray, neighbours: Neighbours, classes: tuple[str, ...],
    out_of_fold: Any,
) -> list[tuple[int, float, int]]:  # fmt: skip
    """Training images whose label two out-of-sample witnesses together doubt, most doubtful
    first: ``(row, score, suggested class)``. The witnesses' probabilities are averaged: the
    bottleneck top's out-of-fold probabilities (as ``wf train-all --cv`` fits them, shared with
    it through the store's cache) and the votes of each image's nearest labelled images in
    every split. An image is flagged when the average's most likely class is not its label
    (cleanlab's ``predicted_neq_given``) and ranked by the average's probability of its label
    (``self_confidence``). Measured on planted flips (README, `benchmarks/audit_planted.py`):
    cleanlab's default filter flagged fewer images than were flipped on the confusable
    dataset, and the top's temperature-calibrated probabilities ranked worse than its raw ones."""
    from cleanlab.filter import find_label_issues

    if out_of_fold is None or len(train) == 0:
        return []
    found = out_of_fold.by_key()
    train = np.array([i for i in train if (images.split[i], images.path[i]) in found], np.int64)
    labels = images.label_index[train]
    if len(np.unique(labels)) < 2:
        return []
    folds = np.stack([found[(images.split[i], images.path[i])] for i in train])
    votes = neighbour_votes(neighbours, images.label_index, len(classes))[train]
    probabilities = (folds + votes) / 2
    ranked = find_label_issues(labels, probabilities, filter_by="predicted_neq_given",
                               return_indices_ranked_by="self_confidence")  # fmt: skip
    return [
        (int(train[r]), 1.0 - float(probabilities[r, labels[r]]), int(np.argmax(probabilities[r])))
        for r in ranked
    ]


def audit_context(settings: AuditSettings, store: FeatureStore) -> Any:
    """The bottleneck job a ``wf train-all`` of this store would plan, at the default recipe
    and the audit's seed: its out-of-fold probabilities are those ``--cv`` computes."""
    from storage.runs import RunsLayout
    from tasks.methods import JobContext, TrainOptions, get_method
    from workflows.train.run import store_snapshot

    manifest, method = store.manifest, get_method("bottleneck")
    return JobContext(dataset=manifest.dataset, method=method.name, classes=manifest.classes,
                      dataset_root=manifest.dataset_root, stores=(store_snapshot(store),),
                      store_filesystem=store.layout.filesystem, runs=RunsLayout(settings.output),
                      recipe=method.recipe, options=TrainOptions(seed=settings.seed))  # fmt: skip


def resplit(images: Images, issues: list[dict]) -> list[dict]:
    """A group-aware split: every duplicate group goes whole to the split most of it is in
    (train on a tie); every other image stays where it is."""
    members: dict[int, list[str]] = {}
    for issue in issues:
        if issue["group"] is not None:
            members.setdefault(issue["group"], []).append(issue["path"])
    split_of = dict(zip(images.path, images.split, strict=True))
    target = {}
    for paths in members.values():
        splits = Counter(split_of[p] for p in set(paths))
        best = max(splits.items(), key=lambda kv: (kv[1], kv[0] == "train"))[0]
        target.update(dict.fromkeys(paths, best))
    return [{"path": p, "split": s, "proposed_split": target.get(p, s)}
            for p, s in zip(images.path, images.split, strict=True)]  # fmt: skip


def write_outputs(location: Location, issues: list[dict], summary: dict, report: str,
                  proposal: list[dict] | None) -> None:  # fmt: skip
    table = pa.Table.from_pylist(issues or [], schema=ISSUE_SCHEMA)
    files = {"issues.csv": table_bytes(table, "csv"),
             "issues.parquet": table_bytes(table, "parquet"),
             "summary.json": (json.dumps(summary, indent=2) + "\n").encode(),
             "report.html": report.encode()}  # fmt: skip
    if proposal is not None:
        files["resplit.csv"] = table_bytes(pa.Table.from_pylist(proposal), "csv")
    for name, data in files.items():
        write_bytes(location.filesystem, location.path(name), data)


ISSUE_SCHEMA = pa.schema([
    ("issue", pa.string()), ("path", pa.string()), ("split", pa.string()), ("label", pa.string()),
    ("score", pa.float64()), ("group", pa.int64()), ("suggested_label", pa.string()),
    ("keep", pa.bool_()),
])  # fmt: skip


def run_audit(settings: AuditSettings) -> dict[str, dict]:
    """Audit every selected dataset of the store; returns each one's summary."""
    from workflows.audit.report import file_sizes, render_report
    from workflows.cluster import ray_cluster

    layout = StoreLayout.at(settings.store)
    chosen = sorted({d for d, b in layout.stores() if b == settings.backbone})
    if not chosen:
        raise StoreError(
            f"no {settings.backbone} feature store under {settings.store}: run `wf extract` first"
        )
    if settings.datasets:
        missing = set(settings.datasets) - set(chosen)
        if missing:
            raise SettingsError(f"no {settings.backbone} store for {', '.join(sorted(missing))}")
        chosen = [d for d in chosen if d in settings.datasets]
    summaries = {}
    pools: list[Any] = []  # the engine's pool, started when out-of-fold fits are needed

    def pool() -> Any:
        import ray

        from tasks.training.engine import TrainingPool

        if not pools:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            pools.append(TrainingPool(max(1, min(settings.folds, cpus))))
        return pools[0]

    import cleanlab.filter  # noqa: F401  (its import, seconds, is not any dataset's audit)

    with ray_cluster(settings.cluster, api_server=False):  # no Ray Train job, no Serve
        try:
            for dataset in chosen:
                store = FeatureStore.open(layout, dataset, settings.backbone)
                store.verify_parts()
                summaries[dataset] = _audit_store(settings, store, pool, file_sizes, render_report)
        finally:
            for started in pools:
                started.close()
    return summaries


def _audit_store(
    settings: AuditSettings, store: FeatureStore, pool: Any, file_sizes: Any, render_report: Any
) -> dict:
    """One dataset's audit, written; its summary."""
    from workflows.train.cross_validate import shared_out_of_fold

    dataset = store.manifest.dataset
    images = load_images(store)
    started = time.perf_counter()
    out_of_fold = shared_out_of_fold(audit_context(settings, store), settings.store,
                                     settings.folds, pool, images)  # fmt: skip
    seconds = time.perf_counter() - started
    sizes = file_sizes(store.manifest.dataset_root)
    issues, summary = audit_images(images, store.manifest.classes, settings, sizes, out_of_fold)
    summary["timings"] = {"out_of_fold": round(seconds, 3), **summary["timings"]}
    summary["seconds"] = round(summary["seconds"] + seconds, 3)
    summary["out_of_fold"] = (
        {"method": "bottleneck", "folds": int(out_of_fold.fold.max()) + 1,
         "reused": out_of_fold.reused, "seconds": round(seconds, 3)}
        if out_of_fold is not None else None
    )  # fmt: skip
    # Whether the validation folder scores like the training one, out of fold: a folder
    # gathered elsewhere (flowers' is harder) makes a number measured on either misleading.
    summary["splits"] = (
        split_agreement(out_of_fold.labels, out_of_fold.probabilities,
                        np.array([split for split, _ in out_of_fold.keys]), out_of_fold.fold)
        if out_of_fold is not None else None
    )  # fmt: skip
    summary.update(
        dataset=dataset, backbone=settings.backbone, manifest_id=store.manifest.manifest_id
    )
    location = Location.at(settings.output.rstrip("/") + "/" + dataset)
    report = render_report(dataset, store.manifest.dataset_root, images, issues, summary)
    write_outputs(location, issues, summary, report,
                  resplit(images, issues) if settings.resplit else None)  # fmt: skip
    return summary


def check_fail_on(settings: AuditSettings, summaries: dict[str, dict]) -> None:
    found = {
        kind: sum(s["counts"].get(kind, 0) for s in summaries.values()) for kind in settings.fail_on
    }
    if any(found.values()):
        raise RunFailed("audit found " + ", ".join(f"{k} ({v})" for k, v in found.items() if v))
