"""Honest numbers from little data, on numpy arrays: folds that keep duplicates together, the
temperature that calibrates out-of-fold probabilities, the paired test between two methods,
and what a job's ``metrics.json`` records of it (:class:`CrossValidated`).

The fits themselves are :mod:`tasks.training.small_fits`'; the workflow that reads the rows and
runs them is :mod:`workflows.train.cross_validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.abstention import DEFAULT_RATE, choose, out_of_fold_distance
from tasks.audit import normalise
from tasks.evaluation import (
    accuracy_interval,
    calibration_noise_floor,
    expected_calibration_error,
    format_accuracy,
    reliability,
)

BINS = 15  # of confidence, for the expected calibration error and the reliability plot
NOISE = 0.05  # a paired difference with a larger p-value is within noise
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.25, 20.0


def grouped_folds(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each image's fold (0..folds-1): stratified by label, every group (an image and its exact
    and near duplicates) in one fold (scikit-learn's ``StratifiedGroupKFold``, shuffled)."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels)
    out = np.full(len(labels), -1, np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "the least populated class has only N members"
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            out[held] = fold
    return out


def group_ids(n: int, groups: list[list[int]]) -> np.ndarray:
    """A group id per row from lists of members (rows in no list are their own group)."""
    ids = np.arange(n, dtype=np.int64)
    for members in groups:
        ids[members] = min(members)
    return ids


def _logits(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(probs) / T)``: the probabilities of the same model with its logits divided
    by ``T`` (for a sigmoid output, ``sigmoid(z / T)``: the same thing)."""
    z = _logits(probs) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(labels: np.ndarray, probs: np.ndarray) -> float:
    """The temperature ``T`` that minimises the log loss of :func:`apply_temperature` on these
    (out-of-fold) probabilities (Guo et al., 2017), within [0.25, 20]: on images a method gets
    all right the loss falls without end as ``T`` shrinks, and a model whose every answer is
    0 or 1 tells its users nothing (nor lets it abstain)."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels, np.int64)
    rows = np.arange(len(labels))

    def loss(log_t: float) -> float:
        p = apply_temperature(probs, float(np.exp(log_t)))
        return float(-np.log(np.clip(p[rows, labels], 1e-12, 1.0)).mean())

    found = minimize_scalar(
        loss, bounds=(np.log(MIN_TEMPERATURE), np.log(MAX_TEMPERATURE)), method="bounded"
    )
    return float(np.exp(found.x))


def cross_fitted_calibration(
    labels: np.ndarray, probs: np.ndarray, folds: np.ndarray, fit_on: np.ndarray | None = None
) -> np.ndarray:
    """Each fold's probabilities calibrated by a temperature fitted on the other folds, so the
    error measured after calibration is not measured on what it was fitted to; with
    ``fit_on`` (a mask), fitted on those rows of the other folds only, as the saved model's
    temperature is (:func:`rows_for_new_images`)."""
    probs, folds = np.asarray(probs, np.float64), np.asarray(folds)
    usable = np.ones(len(folds), bool) if fit_on is None else np.asarray(fit_on, bool)
    out = np.zeros_like(probs)
    for fold in np.unique(folds):
        held = folds == fold
        fit = ~held & usable
        out[held] = apply_temperature(probs[held], fit_temperature(labels[fit], probs[fit]))
    return out


def paired_comparison(labels: np.ndarray, first: np.ndarray, second: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test of two methods' out-of-fold predictions on the same images: how
    many each got right that the other got wrong, and the two-sided p-value (scipy's binomial
    test on those discordant images)."""
    only_a, only_b, p = mcnemar(first.argmax(axis=1) == labels, second.argmax(axis=1) == labels)
    return {"only_first": only_a, "only_second": only_b, "p_value": round(p, 6),
            "within_noise": bool(p >= NOISE)}  # fmt: skip


def mcnemar(right_a: np.ndarray, right_b: np.ndarray) -> tuple[int, int, float]:
    """McNemar's exact test on the same images: how many only ``a`` got right, how many only
    ``b``, and the two-sided p-value (scipy's binomial test on those discordant images)."""
    from scipy.stats import binomtest

    right_a, right_b = np.asarray(right_a, bool), np.asarray(right_b, bool)
    only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    p = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
    return only_a, only_b, float(p)


MIN_VALIDATION_ROWS = 50  # fewer validation images than this never carry the numbers alone


def split_agreement(
    labels: np.ndarray, probs: np.ndarray, splits: np.ndarray, folds: np.ndarray
) -> dict | None:
    """Each labelled split's out-of-fold accuracy (its interval and count), whether the
    validation images score differently from the training ones beyond noise (``differs``:
    Fisher's exact test on right and wrong in each, two-sided, p < 0.05), and whether what wf
    says of new images rests on the validation images alone (``rests_on_validation``): when
    they score *lower* beyond noise, number at least ``MIN_VALIDATION_ROWS`` and span two folds
    or more. A validation folder gathered apart from the training one (another source, time or
    labeller) can be harder than the pooled number says: flowers' scores 6-10 points below its
    training images with the prototype method. An easier one leaves the pooled numbers, which
    then err on the safe side (a lower expectation, more images declined), and a temperature
    fitted on a few images all right would be pushed to its bound. None unless both splits
    have images."""
    from scipy.stats import fisher_exact

    splits, folds = np.asarray(splits), np.asarray(folds)
    right = np.asarray(probs).argmax(axis=1) == np.asarray(labels)
    if not ((splits == "train").any() and (splits == "validation").any()):
        return None
    by_split, counts = {}, []
    for name in ("train", "validation"):
        mine = right[splits == name]
        correct = int(mine.sum())
        low, high = accuracy_interval(correct, len(mine)) or (0.0, 0.0)
        by_split[name] = {
            "accuracy": round(correct / len(mine), 6), "n": len(mine), "correct": correct,
            "interval": [round(low, 6), round(high, 6)],
        }  # fmt: skip
        counts.append([correct, len(mine) - correct])
    p = float(fisher_exact(counts).pvalue)
    validation = by_split["validation"]
    rests = bool(
        p < NOISE and validation["accuracy"] < by_split["train"]["accuracy"]
        and validation["n"] >= MIN_VALIDATION_ROWS
        and len(np.unique(folds[splits == "validation"])) >= 2
    )  # fmt: skip
    return {"by_split": by_split, "p_value": round(p, 6), "differs": p < NOISE,
            "rests_on_validation": rests}  # fmt: skip


def describe_split_agreement(found: dict[str, Any]) -> str:
    """``validation images 0.716 (0.654-0.770, n=232) out of fold, training images 0.817 (...)
    (Fisher p=0.000)``: :func:`split_agreement`'s numbers in words, for the reports."""
    train, validation = (
        format_accuracy(v["accuracy"], v["interval"], v["n"])
        for v in (found["by_split"]["train"], found["by_split"]["validation"])
    )
    return (f"validation images {validation} out of fold, training images {train} (Fisher "
            f"p={found['p_value']:.3f})")  # fmt: skip


def rows_for_new_images(
    n: int, splits: np.ndarray | None, agreement: dict | None
) -> tuple[np.ndarray, str]:
    """Which of ``n`` out-of-fold rows stand for new images (a mask) and their name for
    ``chosen_on`` and ``ece.on``: the validation rows when :func:`split_agreement` says the
    numbers rest on them, else every row."""
    if not (agreement or {}).get("rests_on_validation"):
        return np.ones(n, bool), "out-of-fold"
    return np.asarray(splits) == "validation", "out-of-fold validation"


def prediction_interval(
    correct: int, n: int, expected_n: int, z: float = 1.959964
) -> tuple[float, float] | None:
    """Where an accuracy measured on ``expected_n`` new images would fall (95%), from
    ``correct`` of ``n`` out-of-fold: the estimate's binomial noise and the new set's together,
    ``p +- z sqrt(p (1 - p) (1/n + 1/m))``, with ``p`` shrunk as Agresti and Coull do for the
    variance (``(k + 2) / (n + 4)``), so 28 of 28 does not claim a width of zero."""
    if n <= 0 or expected_n <= 0:
        return None
    shrunk = (correct + 2) / (n + 4)
    half = z * float(np.sqrt(shrunk * (1 - shrunk) * (1 / n + 1 / expected_n)))
    p = correct / n
    return round(max(0.0, p - half), 6), round(min(1.0, p + half), 6)


def expected_accuracy(cv: dict[str, Any] | None, accuracy: float | None, n: int) -> dict | None:
    """What a run's cross-validation (its ``metrics.json`` ``cv``) predicted for an accuracy
    measured on ``n`` images like its own, and whether ``accuracy`` fell there: the 95%
    :func:`prediction_interval`, not the confidence interval of the mean, since a measured
    accuracy carries its own sample's noise. None without a cross-validated accuracy (no
    ``--cv``) or without images; an ensemble's ``cv`` serves as well as a method's."""
    if not cv or cv.get("accuracy") is None or not cv.get("n") or accuracy is None or n <= 0:
        return None
    basis = prediction_basis(cv)
    interval = prediction_interval(basis["correct"], basis["n"], n)
    if interval is None:
        return None
    return {
        "accuracy": basis["accuracy"], "cv_n": basis["n"], "from": basis["from"], "n": n,
        "interval": list(interval), "within": interval[0] <= accuracy <= interval[1],
    }  # fmt: skip


def prediction_basis(cv: dict[str, Any]) -> dict[str, Any]:
    """The out-of-fold images a prediction for new images rests on (``metrics.json``'s
    ``cv``): the validation split's alone when they scored below the training images beyond
    noise (:func:`split_agreement`; new images are taken to be like the validation ones, which
    were held out to stand for them), else every cross-validated image. ``from``: which."""
    splits = cv.get("splits") or {}
    if splits.get("rests_on_validation"):
        validation = splits["by_split"]["validation"]
        return {"from": "validation", "accuracy": validation["accuracy"],
                "correct": validation["correct"], "n": validation["n"]}  # fmt: skip
    n = int(cv["n"])
    return {"from": "all", "accuracy": cv["accuracy"], "correct": round(float(cv["accuracy"]) * n),
            "n": n}  # fmt: skip


@dataclass(frozen=True)
class CrossValidated:
    """What cross-validation found for one (dataset, method) job, for its ``metrics.json``
    (``cv``, ``ece``, ``temperature``) and its saved model (``temperature``)."""

    folds: int
    accuracy: float
    interval: tuple[float, float]
    n: int
    per_fold: tuple[float, ...]
    temperature: float
    ece_before: float
    ece_after: float
    reliability: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    groups: int = 0  # duplicate groups kept inside one fold
    choice: dict[str, Any] = field(default_factory=dict)  # the dataset's choice, when made
    learning_curve: tuple[dict[str, Any], ...] = ()
    seconds: float = 0.0
    abstain: dict[str, Any] | None = None  # thresholds chosen on the out-of-fold images
    # Where the accuracy measured on another `expected_n` images like these would fall (95%).
    prediction_interval: tuple[float, float] | None = None
    expected_n: int = 0
    reused_out_of_fold: bool = False  # the folds' probabilities came from the store's cache
    # The ECE a perfectly calibrated model would show on these images (ECE's own noise).
    ece_floor: float = 0.0
    # Each labelled split's out-of-fold accuracy and whether they differ (split_agreement).
    splits: dict[str, Any] | None = None
    ece_on: str = "out-of-fold"  # the images the temperature and the ECE are on

    @classmethod
    def measure(
        cls, labels: np.ndarray, probs: np.ndarray, folds: np.ndarray, groups: int = 0,
        seconds: float = 0.0, embeddings: np.ndarray | None = None, rate: float = DEFAULT_RATE,
        expected_n: int = 0, splits: np.ndarray | None = None,
    ) -> CrossValidated:  # fmt: skip
        """From every image's out-of-fold probabilities and fold; with the images' embeddings,
        the abstention thresholds too (on the calibrated out-of-fold confidences and each
        image's distance to the nearest image of the other folds); with each image's split,
        the splits' own accuracies, and the prediction interval, the temperature (with the ECE
        and reliability that judge it) and the thresholds from the validation images alone when
        they score below the training ones (:func:`split_agreement`)."""
        labels, folds = np.asarray(labels, np.int64), np.asarray(folds)
        right = probs.argmax(axis=1) == labels
        agreement = split_agreement(labels, probs, splits, folds) if splits is not None else None
        basis = prediction_basis({"accuracy": float(right.mean()), "n": len(labels),
                                  "splits": agreement})  # fmt: skip
        low, high = accuracy_interval(int(right.sum()), len(labels)) or (0.0, 0.0)
        distance = (
            out_of_fold_distance(normalise(embeddings), folds) if embeddings is not None else None
        )
        # Calibrated and given thresholds for images like the new ones: on the validation
        # images alone when the numbers rest on them (as the prediction interval), else on
        # every image.
        on, chosen_on = rows_for_new_images(len(labels), splits, agreement)
        labels_on, probs_on = labels[on], np.asarray(probs)[on]
        calibrated = cross_fitted_calibration(labels, probs, folds, on)[on]
        abstain = choose(calibrated.max(axis=1), None if distance is None else distance[on], rate,
                         chosen_on)  # fmt: skip
        return cls(
            folds=len(np.unique(folds)), accuracy=round(float(right.mean()), 6),
            interval=(round(low, 6), round(high, 6)), n=len(labels),
            per_fold=tuple(round(float(right[folds == f].mean()), 6) for f in np.unique(folds)),
            temperature=round(fit_temperature(labels_on, probs_on), 6),
            ece_before=round(expected_calibration_error(labels_on, probs_on, BINS), 6),
            ece_after=round(expected_calibration_error(labels_on, calibrated, BINS), 6),
            ece_floor=round(calibration_noise_floor(calibrated, BINS), 6), ece_on=chosen_on,
            reliability={"before": reliability(labels_on, probs_on, BINS),
                         "after": reliability(labels_on, calibrated, BINS)},
            groups=groups, seconds=round(seconds, 3), abstain=abstain.to_json(),
            prediction_interval=prediction_interval(basis["correct"], basis["n"], expected_n),
            expected_n=expected_n, splits=agreement,
        )  # fmt: skip

    def metrics(self) -> dict[str, Any]:
        """The job's ``metrics.json`` entries: ``cv``, ``ece``, ``temperature``."""
        cv: dict[str, Any] = {
            "folds": self.folds, "accuracy": self.accuracy, "interval": list(self.interval),
            "n": self.n, "per_fold": list(self.per_fold), "duplicate_groups": self.groups,
            "seconds": self.seconds, "reused_out_of_fold": self.reused_out_of_fold,
        }  # fmt: skip
        if self.choice:
            cv["choice"] = self.choice
        if self.learning_curve:
            cv["learning_curve"] = list(self.learning_curve)
        if self.prediction_interval:
            cv["prediction_interval"] = list(self.prediction_interval)
            cv["prediction_n"] = self.expected_n
            cv["prediction_from"] = (
                "validation" if (self.splits or {}).get("rests_on_validation") else "all"
            )
        if self.splits:
            cv["splits"] = self.splits
        ece = {"before": self.ece_before, "after": self.ece_after, "floor": self.ece_floor,
               "bins": BINS, "on": self.ece_on, "reliability": self.reliability}  # fmt: skip
        return {"cv": cv, "ece": ece, "temperature": self.temperature}
