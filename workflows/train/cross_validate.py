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

The folds' probabilities at 100% (:class:`OutOfFold`) are what `wf audit`'s label check needs
too: whichever of the two runs first computes them and caches them beside the store
(``<store>/<dataset>/<backbone>/_derived/``), named by the method, its recipe, the seed and the
folds, holding the manifest ids they came from; the other reuses them while the store is
unchanged (:func:`shared_out_of_fold`).
"""

from __future__ import annotations

import dataclasses
import io
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from storage.feature_store import FeatureStore
from storage.filesystem import file_info, first_line, read_bytes, write_bytes
from storage.hashing import fingerprint, stable_unit_interval
from storage.layout import StoreLayout
from storage.runs import split_job_key
from tasks.abstention import DEFAULT_RATE, choose
from tasks.cross_validation import (
    CrossValidated,
    cross_fitted_calibration,
    group_ids,
    grouped_folds,
    mcnemar,
    paired_comparison,
    rows_for_new_images,
    split_agreement,
)
from tasks.evaluation import accuracy_interval
from tasks.methods import JobContext, get_method
from tasks.training.inputs import read_rows
from tasks.training.small_fits import FitProblem, out_of_sample_probabilities
from workflows.audit.run import Images, duplicate_groups, load_images

DEFAULT_FOLDS = 5
# --cv's default ("auto"): 5 folds for a dataset of at most this many labelled images. There one
# validation split is a weak witness (on 400 images, 0.90 is +-2.9 points; over 2000 images in
# 5 folds, +-1.3), and 5 small fits of a dense top cost seconds. Above it, --cv K asks for it.
AUTO_MAX_IMAGES = 2000
LEARNING_FRACTIONS = (0.1, 0.25, 0.5)  # and 1.0: the folds themselves
OUT_OF_FOLD_VERSION = 1  # of the cached file and of how it is computed


@dataclass(frozen=True)
class OutOfFold:
    """Every labelled image's class probabilities from a fit of one method (on stored rows)
    that saw neither the image nor its duplicates, and the fold it was held out in; ``keys``
    are ``(split, path)``. ``reused``: read from the cache, not computed by this call."""

    keys: tuple[tuple[str, str], ...]
    labels: np.ndarray
    probabilities: np.ndarray
    fold: np.ndarray
    reused: bool = False

    def by_key(self) -> dict[tuple[str, str], np.ndarray]:
        return dict(zip(self.keys, self.probabilities, strict=True))

    def to_bytes(self, stores: str) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, stores=np.array(stores), splits=np.array([s for s, _ in self.keys]),
                 paths=np.array([p for _, p in self.keys]), labels=self.labels,
                 probabilities=self.probabilities, fold=self.fold)  # fmt: skip
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, stores: str) -> OutOfFold | None:
        """The cached probabilities, or ``None`` when they came from other stores."""
        with np.load(io.BytesIO(data), allow_pickle=False) as saved:
            if str(saved["stores"]) != stores:
                return None
            keys = tuple(zip(saved["splits"].tolist(), saved["paths"].tolist(), strict=True))
            return cls(keys, saved["labels"], saved["probabilities"], saved["fold"], True)


def _cache(store_root: str, context: JobContext, folds: int) -> tuple[Any, str, str]:
    """The store's filesystem, the cache file of ``context``'s out-of-fold probabilities in
    ``folds`` folds, and the id of the stores they come from (every manifest's labelled rows:
    new unlabelled images keep the cache)."""
    layout = StoreLayout.at(store_root)
    recipe = dataclasses.asdict(context.recipe)
    name = fingerprint([context.method, recipe, context.options.seed, folds, OUT_OF_FOLD_VERSION])
    path = layout.derived_path(context.dataset, context.store.backbone,
                               f"out_of_fold-{context.method}-{name[:16]}.npz")  # fmt: skip
    return layout.filesystem, path, fingerprint([s.labelled_id for s in context.stores])


def cached_out_of_fold(store_root: str, context: JobContext, folds: int) -> OutOfFold | None:
    """What an earlier run cached for ``context`` while its stores are unchanged, else None."""
    filesystem, path, stores = _cache(store_root, context, folds)
    if file_info(filesystem, path) is None:
        return None
    try:
        return OutOfFold.from_bytes(read_bytes(filesystem, path), stores)
    except (OSError, ValueError, KeyError):  # unreadable or of another version: computed again
        return None


def _keep_out_of_fold(store_root: str, context: JobContext, folds: int, found: OutOfFold) -> None:
    """Cache ``found`` beside the store; a store this run cannot write (read-only credentials,
    a full disk) only loses the reuse: a warning, and the run goes on."""
    filesystem, path, stores = _cache(store_root, context, folds)
    try:
        write_bytes(filesystem, path, found.to_bytes(stores))
    except OSError as error:
        warnings.warn(f"out-of-fold probabilities not cached beside the store: "
                      f"{first_line(error)}", stacklevel=2)  # fmt: skip


def folds_for(images: int, smallest_class: int, asked: int | None) -> int:
    """How many folds: ``asked`` (0: none), or the default for ``images`` labelled images;
    never more than the smallest class has images (each fold needs one of each)."""
    wanted = (DEFAULT_FOLDS if images <= AUTO_MAX_IMAGES else 0) if asked is None else asked
    folds = min(wanted, smallest_class)
    return folds if folds >= 2 else 0


def _labelled(source: FeatureStore | Images) -> Images:
    """The train and validation images (copy 0) of a store, or of images already loaded."""
    images = source if isinstance(source, Images) else load_images(source)
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

    def folds(self, images: Images, fold_of_image: np.ndarray) -> _RowFolds:
        return _RowFolds(self, images, fold_of_image)


class _RowFolds:
    """The image folds carried to one method's rows: each row's image and fold, the rows each
    fold scores (copy 0 of its images) and the rows a fit trains on."""

    def __init__(self, rows: _Method, images: Images, fold_of_image: np.ndarray) -> None:
        index = {(s, p): i for i, (s, p) in enumerate(zip(images.split, images.path,
                                                          strict=True))}  # fmt: skip
        self.rows, self.fold_of_image = rows, fold_of_image
        self.count = int(fold_of_image.max()) + 1
        self.image_of_row = np.array([index.get(k, -1) for k in rows.keys])
        self.row_fold = np.where(self.image_of_row >= 0, fold_of_image[self.image_of_row], -1)
        self.held = [np.flatnonzero((self.row_fold == f) & (rows.copies == 0))
                     for f in range(self.count)]  # fmt: skip

    def train(self, among: np.ndarray) -> np.ndarray:
        """The rows (every copy) of the images in the mask ``among``."""
        known = self.image_of_row >= 0
        return np.flatnonzero(known & among[np.maximum(self.image_of_row, 0)])

    def full_splits(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.train(self.fold_of_image != f), self.held[f]) for f in range(self.count)]

    def out_of_fold(self, probabilities: list[np.ndarray]) -> OutOfFold:
        """The folds' probabilities at 100% (in the order of :meth:`full_splits`)."""
        held = np.concatenate(self.held)
        return OutOfFold(tuple(self.rows.keys[i] for i in held), self.rows.y[held],
                         np.concatenate(probabilities).astype(np.float32),
                         self.row_fold[held])  # fmt: skip

    def from_cache(self, found: OutOfFold | None) -> list[np.ndarray] | None:
        """The cached probabilities of each fold's held rows; None unless it has them all."""
        if found is None:
            return None
        by_key, folds = found.by_key(), dict(zip(found.keys, found.fold.tolist(), strict=True))
        keys = self.rows.keys
        if any(keys[i] not in by_key or folds[keys[i]] != f
               for f, held in enumerate(self.held) for i in held):  # fmt: skip
            return None
        return [np.stack([by_key[keys[i]] for i in held]) for held in self.held]


def shared_out_of_fold(
    context: JobContext, store_root: str, folds: int, pool: Any = None,
    images: Images | None = None,
) -> OutOfFold | None:  # fmt: skip
    """``context``'s method's out-of-fold probabilities in ``folds`` folds, as ``--cv`` makes
    them (the same folds, fits and seed): from the cache while the stores are unchanged, else
    fitted now and cached. ``pool``: a :class:`~tasks.training.engine.TrainingPool`, or a
    function that starts one (called only when there is something to fit), or None (fit in this
    process). ``images``: the store's images if already loaded (other splits are left out).
    ``None`` when a class has fewer than two images."""
    labelled = _labelled(_store_of(context, store_root) if images is None else images)
    count = folds_for(len(labelled.path), int(np.bincount(labelled.label_index).min()), folds)
    if count == 0:
        return None
    cached = cached_out_of_fold(store_root, context, count)
    if cached is not None:
        return cached
    fold_of_image, _ = _folds_of(labelled, count, context.options.seed)
    rows = _Method(context).folds(labelled, fold_of_image)
    on = pool() if callable(pool) else pool
    found = rows.out_of_fold(out_of_sample_probabilities(rows.rows.problem, rows.full_splits(),
                                                         on))  # fmt: skip
    _keep_out_of_fold(store_root, context, count, found)
    return found


def _store_of(context: JobContext, store_root: str) -> FeatureStore:
    return FeatureStore.open(StoreLayout.at(store_root), context.dataset, context.store.backbone)


def _folds_of(images: Images, folds: int, seed: int) -> tuple[np.ndarray, list[list[int]]]:
    """Each image's fold, with every duplicate group (the audit's) inside one fold."""
    duplicates = duplicate_groups(images)
    fold_of_image = grouped_folds(images.label_index, group_ids(len(images.path), duplicates),
                                  folds, seed)  # fmt: skip
    return fold_of_image, duplicates


def image_folds(
    context: JobContext, store_root: str, asked: int | None
) -> tuple[Images, np.ndarray, list[list[int]]] | None:
    """The dataset's labelled images, each one's fold, and the duplicate groups the folds keep
    together; ``None`` when it gets no cross-validation (too large for the default, or a class
    with fewer than two images)."""
    images = _labelled(_store_of(context, store_root))
    folds = folds_for(len(images.path), int(np.bincount(images.label_index).min()), asked)
    if folds == 0:
        return None
    fold_of_image, duplicates = _folds_of(images, folds, context.options.seed)
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
    order = np.array([stable_unit_interval(f"{s}/{p}", f"wf-curve-{first.options.seed}")
                      for s, p in zip(images.split, images.path, strict=True)])  # fmt: skip
    found: dict[str, CrossValidated] = {}
    scored: dict[str, dict[tuple[str, str], np.ndarray]] = {}
    calibrated: dict[str, dict[tuple[str, str], np.ndarray]] = {}
    truth: dict[tuple[str, str], int] = {}
    fold_of: dict[tuple[str, str], int] = {}  # each image's fold
    for context in contexts:
        began = time.perf_counter()
        method = _Method(context)
        rows = method.folds(images, fold_of_image)
        # The learning curve's fits, then (unless cached) the folds' own.
        splits = [
            (rows.train(_subsample(images.label_index, fold_of_image != f, share, order)),
             rows.held[f])
            for share in LEARNING_FRACTIONS for f in range(folds)
        ]  # fmt: skip
        cached = rows.from_cache(cached_out_of_fold(store_root, context, folds))
        if cached is None:
            splits += rows.full_splits()
        probabilities = out_of_sample_probabilities(method.problem, splits, pool)
        if cached is None:
            _keep_out_of_fold(store_root, context, folds,
                              rows.out_of_fold(probabilities[-folds:]))  # fmt: skip
        else:
            probabilities += cached
        curve = []
        for number, fraction in enumerate((*LEARNING_FRACTIONS, 1.0)):
            held = np.concatenate(rows.held)
            probs = np.concatenate(probabilities[number * folds : (number + 1) * folds])
            right = probs.argmax(axis=1) == method.y[held]
            low, high = accuracy_interval(int(right.sum()), len(right)) or (0.0, 0.0)
            curve.append({"fraction": fraction, "accuracy": round(float(right.mean()), 6),
                          "interval": [round(low, 6), round(high, 6)], "n": len(right),
                          "right": right})  # fmt: skip
        split_of_row = np.array([method.keys[i][0] for i in held])  # each held row's split
        # The embedding abstention measures: the top's input, the rows flattened.
        result = CrossValidated.measure(
            method.y[held], probs, rows.row_fold[held], groups=len(duplicates),
            seconds=time.perf_counter() - began,
            embeddings=method.x[held].reshape(len(held), -1),
            rate=context.options.abstain_rate,
            # another split the size of validation (else of a fold)
            expected_n=context.store.images.get("validation") or len(held) // folds,
            splits=split_of_row,
        )  # fmt: skip
        scored[context.key] = {method.keys[i]: p for i, p in zip(held, probs, strict=True)}
        # Each method's probabilities calibrated as its saved model is (the ensemble averages
        # those): on the rows its temperature was fitted to.
        fitted = cross_fitted_calibration(
            method.y[held], probs, rows.row_fold[held],
            rows_for_new_images(len(held), split_of_row, result.splits)[0],
        )  # fmt: skip
        calibrated[context.key] = {method.keys[i]: p for i, p in zip(held, fitted, strict=True)}
        truth.update({method.keys[i]: int(method.y[i]) for i in held})
        fold_of.update({method.keys[i]: int(f) for i, f in zip(held, rows.row_fold[held],
                                                                strict=True)})  # fmt: skip
        found[context.key] = dataclasses.replace(
            result, learning_curve=_curve(curve), reused_out_of_fold=cached is not None
        )
    return dataset_choice(found, scored, calibrated, truth, time.perf_counter() - started,
                          first.options.abstain_rate, fold_of)  # fmt: skip


def _curve(points: list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """The learning curve's points and the sentence the report writes from it: whether the
    last doubling of labels (50% to 100%) helped beyond noise (McNemar on the same images)."""
    _, _, p = mcnemar(points[-1]["right"], points[-2]["right"])
    points_gained = 100 * (points[-1]["accuracy"] - points[-2]["accuracy"])
    if p < 0.05 and points_gained > 0:
        verdict = f"more labels would likely help: {points_gained:+.1f} points from 50% to 100%"
    else:
        verdict = f"flat: {points_gained:+.1f} points from 50% to 100%, within noise"
    out = [{k: v for k, v in point.items() if k != "right"} for point in points]
    out[-1]["verdict"] = verdict
    out[-1]["p_value"] = round(float(p), 6)
    return tuple(out)


def dataset_choice(
    found: dict[str, CrossValidated], scored: dict[str, dict[tuple[str, str], np.ndarray]],
    calibrated: dict[str, dict[tuple[str, str], np.ndarray]], truth: dict[tuple[str, str], int],
    seconds: float, rate: float = DEFAULT_RATE, fold_of: dict[tuple[str, str], int] | None = None,
) -> dict[str, CrossValidated]:  # fmt: skip
    """The dataset's choice written into each job's result: the method with the best
    cross-validated accuracy, its paired test against the next best, and (with two methods or
    more) the average of every method's calibrated out-of-fold probabilities tested against the
    best one (``ensemble``: ``beats_best`` when it is right more often beyond noise). ``scored``
    and ``calibrated``: by job key, each image's out-of-fold probabilities, raw and calibrated
    (by temperatures fitted on the other folds); ``truth``: each image's label; ``rate``: the
    in-distribution share the average's abstention threshold declines (``ensemble.abstain``);
    ``fold_of``: each image's fold, for the average's own ``splits`` (:func:`split_agreement`)."""
    ranked = sorted(found, key=lambda key: -found[key].accuracy)
    choice: dict[str, Any] = {"chosen": split_job_key(ranked[0])[1], "seconds": round(seconds, 3),
                              "among": sorted(split_job_key(key)[1] for key in found)}  # fmt: skip
    if len(ranked) > 1:
        best, second = scored[ranked[0]], scored[ranked[1]]
        common = sorted(set(best) & set(second))
        labels = np.array([truth[k] for k in common])
        test = paired_comparison(labels, np.stack([best[k] for k in common]),
                                 np.stack([second[k] for k in common]))  # fmt: skip
        choice.update(next=split_job_key(ranked[1])[1], images=len(common), **test)
        choice["ensemble"] = _ensemble(ranked, scored, calibrated, truth, rate, fold_of or {})
    return {key: dataclasses.replace(value, choice=choice) for key, value in found.items()}


def _ensemble(
    ranked: list[str], scored: dict[str, dict[tuple[str, str], np.ndarray]],
    calibrated: dict[str, dict[tuple[str, str], np.ndarray]], truth: dict[tuple[str, str], int],
    rate: float, fold_of: dict[tuple[str, str], int],
) -> dict[str, Any]:  # fmt: skip
    """The average of the methods' calibrated probabilities against the best method alone, on
    the images every method scored, its splits' own accuracies, and the confidence below which
    the average would decline ``rate`` of them (of the validation images alone when the numbers
    rest on them, as for a method)."""
    common = sorted(set.intersection(*(set(calibrated[key]) for key in ranked)))
    labels = np.array([truth[k] for k in common])
    average = np.mean([np.stack([calibrated[key][k] for k in common]) for key in ranked], axis=0)
    right = average.argmax(axis=1) == labels
    low, high = accuracy_interval(int(right.sum()), len(right)) or (0.0, 0.0)
    test = paired_comparison(labels, average, np.stack([scored[ranked[0]][k] for k in common]))
    beats = not test["within_noise"] and test["only_first"] > test["only_second"]
    split_of_row = np.array([split for split, _ in common])
    agreement = (
        split_agreement(labels, average, split_of_row, np.array([fold_of[k] for k in common]))
        if fold_of else None
    )  # fmt: skip
    on, chosen_on = rows_for_new_images(len(common), split_of_row, agreement)
    abstain = choose(average.max(axis=1)[on], None, rate, chosen_on).to_json()
    return {"members": [split_job_key(key)[1] for key in ranked],
            "accuracy": round(float(right.mean()), 6), "interval": [round(low, 6), round(high, 6)],
            "n": len(common), "against": split_job_key(ranked[0])[1],
            "only_ensemble": test["only_first"], "only_best": test["only_second"],
            "p_value": test["p_value"], "within_noise": test["within_noise"],
            "beats_best": beats, "splits": agreement,
            "abstain": abstain}  # fmt: skip
