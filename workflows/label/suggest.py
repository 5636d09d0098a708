"""`wf suggest`: which unlabelled images to label next, from what the store and a run hold.

Every unlabelled image already has its embedding in the store (`wf extract` stores the split
``unlabelled``), and a run holds a top trained on the labelled ones; scoring the pool is then
one small matrix product, no image decoded. The batch is chosen in two steps:

1. **Uncertainty**: each image's margin between its two most probable classes under the
   trained model's calibrated probabilities (the run's cross-validated temperature when it has
   one); ``score = 1 - margin``. Images are taken least sure first.
2. **Spread**: an image is passed over while it lies within the pool's own spacing (the median
   distance from an unlabelled image to its nearest other one, cosine on the unit embeddings;
   to its nearest that is no near duplicate when most have one; never less than the
   near-duplicate limit) of an image already labelled or already chosen: a hundred
   near-copies of one confusing photo cost one label, and a region the labels already cover
   gives way to one they do not.

Near duplicates (the audit's thresholds) of an image already labelled or already chosen are
never suggested. The ranking does not depend on the budget: a batch of 10 is the first 10 of a
batch of 100. ``reason`` says what decided each pick: ``uncertain`` (the least sure image
left), ``spread`` (a less sure image, chosen after more uncertain ones were passed over for
lying close to what is known) or ``filled`` (the pool ran out of images apart from what is
known, so the least sure of the rest that is no near duplicate). The design was chosen from
fourteen (BADGE, Cluster-Margin, diverse mini-batch k-means, class quotas, other radii, the
farthest-first shortlist of 2026-12-01) on 5 seeds and confirmed on 5 fresh ones: above
random batches and at or above margin alone on both datasets (``benchmarks/label_next.py``,
``benchmarks/label_next_designs.py``; the numbers are in docs/benchmarks.md).
"""

from __future__ import annotations

import html
import os
from typing import Any

import numpy as np
import pyarrow as pa

from storage.errors import SettingsError, StoreError
from storage.feature_store import FeatureStore, tap_column
from storage.filesystem import Location, table_bytes, write_bytes
from storage.layout import StoreLayout
from storage.runs import Artifact, RunsLayout
from tasks.abstention import BLOCK, nearest_distance
from tasks.audit import normalise
from tasks.cross_validation import apply_temperature
from tasks.heads import probabilities
from tasks.methods import get_method
from workflows.audit.settings import NEAR_RELATIVE, NEAR_SIMILARITY
from workflows.datasets import SPLITS, UNLABELLED
from workflows.label.settings import SuggestSettings

REASONS = ("uncertain", "spread", "filled")
SIMILARITIES = 2**25  # the most pool-to-pool similarities held at once (128 MiB)
# Exact copies are this far apart after float32 rounding (about 1e-7): the near-duplicate
# limit is never less, even when most images have ten copies and the audit's scale is 0.
NEAR_FLOOR = 1e-5


def margin_scores(probs: np.ndarray) -> np.ndarray:
    """``1 - (p_first - p_second)``: 1 for a coin toss, 0 for a sure answer."""
    top = np.sort(probs, axis=1)[:, -2:]
    return 1.0 - (top[:, 1] - top[:, 0])


def redundancy_radius(pool: np.ndarray, near: float = 0.0, sample: int = 2000) -> float:
    """The median cosine distance from an unlabelled image to its nearest other one: the
    pool's own spacing. ``pool``: unit embeddings; the median is taken over a seeded sample
    of at most ``sample`` images, each against the whole pool. When that median is no more
    than ``near`` (over half the pool has a near duplicate in it), the median distance to the
    nearest image that is no near duplicate instead, so copies do not switch spread off."""
    n = len(pool)
    if n < 2:
        return 0.0
    rows = np.sort(np.random.default_rng(0).permutation(n)[:sample])
    every = np.asarray(pool, np.float32)
    step = max(1, min(BLOCK, SIMILARITIES // n))  # at most 32 Mi similarities at once
    found = np.empty(len(rows), np.float32)
    apart = np.empty(len(rows), np.float32)  # to the nearest that is no near duplicate
    for start in range(0, len(rows), step):
        part = rows[start : start + step]
        similarity = every[part] @ every.T
        similarity[np.arange(len(part)), part] = -np.inf  # not its own neighbour
        found[start : start + step] = 1.0 - similarity.max(axis=1)
        similarity[similarity >= 1.0 - near] = -np.inf
        apart[start : start + step] = 1.0 - similarity.max(axis=1)
    spacing = float(np.median(found))
    if spacing > near:
        return spacing
    apart = apart[np.isfinite(apart)]
    return float(np.median(apart)) if len(apart) else near


def choose_batch(
    pool: np.ndarray, labelled: np.ndarray, scores: np.ndarray, budget: int,
    spread: bool = True,
) -> tuple[list[int], list[str]]:  # fmt: skip
    """Indices into ``pool`` (unit embeddings) of the batch to label, in the order picked, and
    why each: see the module's two steps. ``labelled``: unit embeddings of the images already
    labelled; ``scores``: :func:`margin_scores`. ``spread`` off ranks by uncertainty alone
    (what the benchmark compares against); near duplicates are left out either way."""
    n = len(pool)
    budget = min(budget, n)
    near = max(_near_limit(pool, labelled), NEAR_FLOOR)
    radius = max(near, redundancy_radius(pool, near)) if spread else near
    known = nearest_distance(pool, labelled, k=1) if len(labelled) else np.full(n, 2.0)
    order = np.argsort(-scores, kind="stable")
    taken = np.zeros(n, bool)
    picked = np.empty((budget, pool.shape[1]), np.float32)  # the chosen images' embeddings
    chosen: list[int] = []
    reasons: list[str] = []
    passed_over = False
    for limit, reason in ((radius, None), (near, "filled")):  # then fill, if the pool ran out
        for i in order:
            if len(chosen) == budget:
                return chosen, reasons
            if taken[i]:
                continue
            # The distance to the nearest image labelled or chosen so far, asked only of the
            # images visited (a pass reads the pool once, not once a pick).
            distance = known[i]
            if chosen:
                distance = min(distance, 1.0 - float((picked[: len(chosen)] @ pool[i]).max()))
            if distance <= limit:  # within reach of an image labelled or chosen
                passed_over |= bool(distance > near)  # for spread, not as a copy
                continue
            taken[i] = True
            picked[len(chosen)] = pool[i]
            chosen.append(int(i))
            reasons.append(reason or ("spread" if passed_over else "uncertain"))
    return chosen, reasons


def _near_limit(pool: np.ndarray, labelled: np.ndarray) -> float:
    """The cosine distance under which two images are near duplicates, as the audit finds them:
    at most ``1 - NEAR_SIMILARITY`` and at most ``NEAR_RELATIVE`` x the typical distance to a
    10th neighbour (on a sample of the images)."""
    from tasks.audit import nearest, relative_scale

    picked = np.random.default_rng(0).permutation(len(pool) + len(labelled))[:2000]
    mine = picked < len(pool)  # the sample without copying pool and labelled together
    sample = np.empty((len(picked), pool.shape[1]), pool.dtype)
    sample[mine] = pool[picked[mine]]
    sample[~mine] = labelled[picked[~mine] - len(pool)]
    if len(sample) < 12:
        return 1.0 - NEAR_SIMILARITY
    return min(1.0 - NEAR_SIMILARITY, NEAR_RELATIVE * relative_scale(nearest(sample, 10)))


def _rows(store: FeatureStore, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    columns = ["path", "label_index", tap_column("bottleneck")]
    table = store.read_table(split, columns, first_copy_only=True)
    from storage.feature_store import tap_to_numpy

    x = tap_to_numpy(table[tap_column("bottleneck")], store.manifest.taps["bottleneck"].shape)
    return (table["path"].to_pylist(), x.astype(np.float32).reshape(len(x), -1),
            table["label_index"].to_numpy())  # fmt: skip


def model_probabilities(runs: RunsLayout, dataset: str, method: str, x: np.ndarray) -> np.ndarray:
    """The run's calibrated probabilities for stored rows ``x``: the job's trained top (its
    ``trained_weights.npz``) on the rows, divided by its cross-validated temperature."""
    files = runs.job(dataset, method)
    if not files.exists():
        raise StoreError(
            f"{dataset}: no trained {method} in {runs.location.uri}: "
            f"run `wf train-all --methods {method}` first"
        )
    trained = files.read_weights(Artifact.TRAINED_WEIGHTS)
    metrics = files.metrics()
    classes = len(files.classes())
    chosen = get_method(method)
    if chosen.closed_form:
        raw = chosen.predict_closed_form(trained, x)
    else:
        import keras

        from tasks.training.job import predict_in_batches
        from tasks.training.weights import set_named_weights

        top = chosen.build_on_rows(keras, tuple(x.shape[1:]), classes)
        set_named_weights(top, trained)
        raw = predict_in_batches(top, x)
    found = probabilities(raw, classes)
    temperature = metrics.temperature
    return apply_temperature(found, temperature) if temperature else found


def suggest_dataset(settings: SuggestSettings, dataset: str) -> dict[str, Any]:
    """Rank one dataset's unlabelled images and write its suggestions; returns its summary."""
    layout = StoreLayout.at(settings.store)
    store = FeatureStore.open(layout, dataset, settings.backbone)
    if not store.has_split(UNLABELLED):
        raise StoreError(f"{dataset}: no unlabelled images in the store (put them in "
                         f"{dataset}/unlabelled/ and run `wf extract`)")  # fmt: skip
    runs = RunsLayout(settings.runs)
    warnings = []
    job = runs.job(dataset, settings.method)
    trained_on = job.metrics().store_ids.get(settings.backbone) if job.exists() else None
    if trained_on and trained_on != store.manifest.labelled_id:
        warnings.append(f"{dataset}: the {settings.method} run predates the store's labels; "
                        "`wf train-all` first for better suggestions")  # fmt: skip
    paths, x, _ = _rows(store, UNLABELLED)
    found = [_rows(store, s) for s in SPLITS if store.has_split(s)]
    labelled = normalise(np.concatenate([f[1] for f in found]))
    probs = model_probabilities(runs, dataset, settings.method, x)
    classes = list(store.manifest.classes)
    scores = margin_scores(probs)
    predicted = probs.argmax(axis=1)
    chosen, reasons = choose_batch(normalise(x), labelled, scores, settings.budget)
    rows = [{"rank": rank + 1, "path": paths[i], "score": round(float(scores[i]), 6),
             "predicted_label": classes[int(predicted[i])],
             "probability": round(float(probs[i, predicted[i]]), 6), "reason": reason}
            for rank, (i, reason) in enumerate(zip(chosen, reasons, strict=True))]  # fmt: skip
    out = Location.at(settings.output)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    for file_format in ("csv", "parquet"):
        path = out.path(dataset, f"suggestions.{file_format}")
        write_bytes(out.filesystem, path, table_bytes(table, file_format))
    root = store.manifest.dataset_root
    write_bytes(out.filesystem, out.path(dataset, "report.html"),
                render_suggestions(dataset, root, rows, len(paths)).encode())  # fmt: skip
    return {"dataset": dataset, "unlabelled": len(paths), "suggested": len(rows),
            "reasons": {r: reasons.count(r) for r in REASONS},
            "by_class": {c: sum(1 for r in rows if r["predicted_label"] == c) for c in classes},
            "method": settings.method, "csv": out.display(out.path(dataset, "suggestions.csv")),
            "report": out.display(out.path(dataset, "report.html")),
            "warnings": warnings}  # fmt: skip


SCHEMA = pa.schema([("rank", pa.int32()), ("path", pa.string()), ("score", pa.float64()),
                    ("predicted_label", pa.string()), ("probability", pa.float64()),
                    ("reason", pa.string())])  # fmt: skip


def run_suggest(settings: SuggestSettings) -> dict[str, dict[str, Any]]:
    """Suggestions for every dataset asked for (or every one with unlabelled images)."""
    layout = StoreLayout.at(settings.store)
    stored = sorted({d for d, b in layout.stores() if b == settings.backbone})
    if not stored:
        raise StoreError(f"no {settings.backbone} feature store under {settings.store}")
    unknown = [d for d in settings.datasets if d not in stored]
    if unknown:
        raise SettingsError(f"no store for {', '.join(unknown)}; the store has {', '.join(stored)}")
    names = list(settings.datasets) or [
        d for d in stored if FeatureStore.open(layout, d, settings.backbone).has_split(UNLABELLED)
    ]
    if not names:
        raise StoreError(f"no dataset under {settings.store} has unlabelled images "
                         "(DATASET/unlabelled/, then `wf extract`)")  # fmt: skip
    return {name: suggest_dataset(settings, name) for name in names}


def render_suggestions(dataset: str, root: str, rows: list[dict[str, Any]], pool: int) -> str:
    """A contact sheet of the batch: each image with its rank, predicted label and why."""
    from workflows.audit.report import STYLE, thumbnail

    location = Location.at(root)
    cards = "".join(
        f'<figure class="card">{thumbnail(location, r["path"])}<figcaption '
        f'title="{html.escape(r["path"])}">#{r["rank"]} {html.escape(r["predicted_label"])} '
        f"{r['probability']:.2f}<br><small>{html.escape(r['reason'])} · "
        f"{html.escape(os.path.basename(r['path']))[-28:]}</small></figcaption></figure>"
        for r in rows
    )
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>wf suggest: "
            f"{html.escape(dataset)}</title><style>{STYLE}</style></head><body>"
            f"<h1>Label next: {html.escape(dataset)}</h1><p>{len(rows)} of {pool} unlabelled "
            f"images, most useful first (the least sure, passing over those close to an image "
            f"already labelled or chosen). "
            f"Move each into its class folder, or list them as <code>path,label</code> in a CSV "
            f"for <code>wf label</code>, then <code>wf extract</code> and <code>wf train-all"
            f"</code>.</p><div class='group'>{cards}</div></body></html>")  # fmt: skip
