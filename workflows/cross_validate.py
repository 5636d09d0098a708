"""`wf train-all --cv K`: every method on stored features cross-validated before its job trains.

For each dataset: the labelled images (train and validation; a test split is never read) are
put in K folds, stratified by class, each group of exact and near duplicates (as `wf audit`
finds them) inside one fold. For each method with small fits (bottleneck, fusion), K fits on
the engine's pool (:func:`tasks.training.small_fits.out_of_sample_probabilities`) give every
image's probabilities from a model that never saw it or its duplicates; a training image's
augmented copies train with it and are never scored. From those come the method's accuracy
with its interval and per-fold numbers, the temperature its saved model is calibrated by and
the calibration error before and after, the learning curve (the same folds with 10, 25 and 50%
of each fold's training images per class), and the dataset's choice: the best method, tested
against the next best on the same images (McNemar). The results travel to the jobs in their
:class:`~tasks.methods.JobContext` (``cv``), which write them to ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from storage.feature_store import FeatureStore
from storage.hashing import stable_unit_interval
from storage.layout import StoreLayout
from tasks.cross_validation import CrossValidated, group_ids, grouped_folds, paired_comparison
from tasks.evaluation import accuracy_interval
from tasks.methods import JobContext, get_method
from tasks.training.inputs import read_rows
from tasks.training.small_fits import FitProblem, out_of_sample_probabilities
from workflows.audit import Images, duplicate_groups, load_images

DEFAULT_FOLDS = 5
# --cv's default ("auto"): 5 folds for a dataset of at most this many labelled images. There one
# validation split is a weak witness (on 400 images, 0.90 is +-2.9 points; over 2000 images in
# 5 folds, +-1.3), and 5 small fits of a dense top cost seconds. Above it, --cv K asks for it.
AUTO_MAX_IMAGES = 2000
LEARNING_FRACTIONS = (0.1, 0.25, 0.5)  # and 1.0: the folds themselves


def folds_for(images: int, smallest_class: int, asked: int | None) -> int:
    """How many folds: ``asked`` (0: none), or the default for ``images`` labelled images;
    never more than the smallest class has images (each fold needs one of each)."""
    wanted = (DEFAULT_FOLDS if images <= AUTO_MAX_IMAGES else 0) if asked is None else asked
    folds = min(wanted, smallest_class)
    return folds if folds >= 2 else 0


def _labelled(store: FeatureStore) -> Images:
    images = load_images(store)
    keep = [i for i, split in enumerate(images.split) if split in ("train", "validation")]
    return Images([images.path[i] for i in keep], [images.split[i] for i in keep],
                  [images.label[i] for i in keep], images.label_index[keep],
                  [images.image_id[i] for i in keep], images.embedding[keep])  # fmt: skip


def _subsample(labels: np.ndarray, among: np.ndarray, fraction: float, order: np.ndarray):
    """A mask of ``fraction`` of each class's images in ``among`` (at least one each), first in
    ``order`` (a fixed shuffle): the same images for a given fold and seed."""
    chosen = np.zeros(len(labels), bool)
    for label in np.unique(labels[among]):
        members = np.flatnonzero(among & (labels == label))
        members = members[np.argsort(order[members])]
        chosen[members[: max(1, round(fraction * len(members)))]] = True
    return chosen


class _Method:
    """One method's rows for cross-validation: every stored row of the labelled images (a
    training image's augmented copies too), and which of them are scored (copy 0)."""

    def __init__(self, context: JobContext) -> None:
        method = get_method(context.method)
        parts = [read_rows(context, method, s) for s in ("train", "validation")
                 if context.has_split(s)]  # fmt: skip
        splits = [s for s in ("train", "validation") if context.has_split(s)]
        self.x = np.concatenate([p.x for p in parts]).astype(np.float32)
        self.y = np.concatenate([p.y for p in parts])
        self.copies = np.concatenate([p.copies for p in parts])
        self.keys = [(s, path) for s, p in zip(splits, parts, strict=True) for path in p.paths]
        self.problem = FitProblem(self.x, self.y, len(context.classes), method.name,
                                  context.recipe, context.options.seed)  # fmt: skip


def image_folds(
    context: JobContext, store_root: str, asked: int | None
) -> tuple[Images, np.ndarray, list[list[int]]] | None:
    """The dataset's labelled images, each one's fold, and the duplicate groups the folds keep
    together; ``None`` when it gets no cross-validation (too large for the default, or a class
    with fewer than two images)."""
    store = FeatureStore.open(StoreLayout.at(store_root), context.dataset, context.store.backbone)
    images = _labelled(store)
    folds = folds_for(len(images.path), int(np.bincount(images.label_index).min()), asked)
    if folds == 0:
        return None
    duplicates = duplicate_groups(images)
    fold_of_image = grouped_folds(images.label_index, group_ids(len(images.path), duplicates),
                                  folds, context.options.seed)  # fmt: skip
    return images, fold_of_image, duplicates


def cross_validate_dataset(
    contexts: Sequence[JobContext], store_root: str, asked: int | None, pool: Any
) -> dict[str, CrossValidated]:
    """Cross-validate each of ``contexts`` (one dataset's jobs on stored rows); by job key."""
    started = time.perf_counter()
    first = contexts[0]
    planned = image_folds(first, store_root, asked)
    if planned is None:
        return {}
    images, fold_of_image, duplicates = planned
    folds = int(fold_of_image.max()) + 1
    image_index = {(s, p): i for i, (s, p) in enumerate(zip(images.split, images.path,
                                                             strict=True))}  # fmt: skip
    order = np.array([stable_unit_interval(f"{s}/{p}", f"wf-curve-{first.options.seed}")
                      for s, p in zip(images.split, images.path, strict=True)])  # fmt: skip
    found: dict[str, CrossValidated] = {}
    scored: dict[str, dict[tuple[str, str], np.ndarray]] = {}
    truth: dict[tuple[str, str], int] = {}
    for context in contexts:
        began = time.perf_counter()
        rows = _Method(context)
        image_of_row = np.array([image_index.get(k, -1) for k in rows.keys])
        row_fold = np.where(image_of_row >= 0, fold_of_image[image_of_row], -1)
        held_rows = [np.flatnonzero((row_fold == f) & (rows.copies == 0)) for f in range(folds)]
        splits: list[tuple[np.ndarray, np.ndarray]] = []
        points: list[tuple[float, int]] = []
        for fraction in (*LEARNING_FRACTIONS, 1.0):
            for f in range(folds):
                among = fold_of_image != f
                if fraction < 1.0:
                    among = _subsample(images.label_index, among, fraction, order)
                train = np.flatnonzero((image_of_row >= 0) & among[image_of_row])
                splits.append((train, held_rows[f]))
                points.append((fraction, f))
        probabilities = out_of_sample_probabilities(rows.problem, splits, pool)
        curve = []
        for fraction in (*LEARNING_FRACTIONS, 1.0):
            chosen = [i for i, (share, _) in enumerate(points) if share == fraction]
            held = np.concatenate([splits[i][1] for i in chosen])
            probs = np.concatenate([probabilities[i] for i in chosen])
            right = probs.argmax(axis=1) == rows.y[held]
            low, high = accuracy_interval(int(right.sum()), len(right)) or (0.0, 0.0)
            curve.append({"fraction": fraction, "accuracy": round(float(right.mean()), 6),
                          "interval": [round(low, 6), round(high, 6)], "n": len(right),
                          "right": right})  # fmt: skip
            if fraction == 1.0:
                # The embedding abstention measures: the top's input, the rows flattened.
                result = CrossValidated.measure(
                    rows.y[held], probs, row_fold[held], groups=len(duplicates),
                    seconds=time.perf_counter() - began,
                    embeddings=rows.x[held].reshape(len(held), -1),
                    rate=context.options.abstain_rate,
                    # another split the size of validation (else of a fold)
                    expected_n=context.store.images.get("validation") or len(held) // folds,
                )  # fmt: skip
                scored[context.key] = {rows.keys[i]: p for i, p in zip(held, probs, strict=True)}
                truth.update({rows.keys[i]: int(rows.y[i]) for i in held})
        found[context.key] = dataclasses.replace(
            result, learning_curve=_curve(curve, context.recipe.epochs)
        )
    return _choose(found, scored, truth, time.perf_counter() - started)


def _curve(points: list[dict[str, Any]], epochs: int) -> tuple[dict[str, Any], ...]:
    """The learning curve's points and the sentence the report writes from it: whether the
    last doubling of labels (50% to 100%) helped beyond noise (McNemar on the same images)."""
    from scipy.stats import binomtest

    half, full = points[-2]["right"], points[-1]["right"]
    gained, lost = int((full & ~half).sum()), int((half & ~full).sum())
    p = binomtest(gained, gained + lost).pvalue if gained + lost else 1.0
    points_gained = 100 * (points[-1]["accuracy"] - points[-2]["accuracy"])
    if p < 0.05 and points_gained > 0:
        verdict = f"more labels would likely help: {points_gained:+.1f} points from 50% to 100%"
    else:
        verdict = f"flat: {points_gained:+.1f} points from 50% to 100%, within noise"
    out = [{k: v for k, v in point.items() if k != "right"} for point in points]
    out[-1]["verdict"] = verdict
    out[-1]["p_value"] = round(float(p), 6)
    return tuple(out)


def _choose(
    found: dict[str, CrossValidated], scored: dict[str, dict[tuple[str, str], np.ndarray]],
    truth: dict[tuple[str, str], int], seconds: float,
) -> dict[str, CrossValidated]:  # fmt: skip
    """The dataset's choice written into each job's result: the method with the best
    cross-validated accuracy, and its paired test against the next best."""
    ranked = sorted(found, key=lambda key: -found[key].accuracy)
    choice: dict[str, Any] = {"chosen": ranked[0].split("/", 1)[1], "seconds": round(seconds, 3),
                              "among": sorted(key.split("/", 1)[1] for key in found)}  # fmt: skip
    if len(ranked) > 1:
        best, second = scored[ranked[0]], scored[ranked[1]]
        common = sorted(set(best) & set(second))
        labels = np.array([truth[k] for k in common])
        test = paired_comparison(labels, np.stack([best[k] for k in common]),
                                 np.stack([second[k] for k in common]))  # fmt: skip
        choice.update(next=ranked[1].split("/", 1)[1], images=len(common), **test)
    return {key: dataclasses.replace(value, choice=choice) for key, value in found.items()}
