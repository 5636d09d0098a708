"""Classification metrics and plots, from labels and class probabilities.

Every accuracy comes with the images it was measured on (``n``) and a 95% Wilson score
interval (:func:`accuracy_interval`): on 28 images, 28 right is consistent with a true accuracy
of 0.88. Calibration is measured as the expected calibration error over 15 equal-width bins of
confidence (:func:`expected_calibration_error`).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, classes: tuple[str, ...] | list[str]
) -> dict[str, Any]:
    """Accuracy, log loss, per-class precision/recall/F1 and the confusion matrix
    (rows: true class, columns: predicted class)."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    predicted = probs.argmax(axis=1)
    count = len(classes)
    confusion = np.zeros((count, count), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = {}
    for index, name in enumerate(classes):
        true_positive = confusion[index, index]
        precision = true_positive / max(confusion[:, index].sum(), 1)
        recall = true_positive / max(confusion[index, :].sum(), 1)
        f1 = 2 * precision * recall / max(precision + recall, 1e-12)
        per_class[name] = {
            "precision": round(float(precision), 6),
            "recall": round(float(recall), 6),
            "f1": round(float(f1), 6),
            "support": int(confusion[index, :].sum()),
        }
    chosen = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
    correct = int((predicted == labels).sum())
    interval = accuracy_interval(correct, len(labels))
    return {
        "accuracy": round(correct / len(labels) if len(labels) else 0.0, 6),
        "n": len(labels),
        "accuracy_interval": [round(v, 6) for v in interval] if interval else None,
        "loss": round(float(-np.log(chosen).mean()) if len(labels) else 0.0, 6),
        "examples": len(labels),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "classes": list(classes),
    }


def accuracy_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """The Wilson score interval of an accuracy of ``correct`` out of ``n`` (scipy's
    ``binomtest(...).proportion_ci(method="wilson")``); ``None`` for no images. Wilson rather
    than the normal approximation: it stays inside [0, 1] and is honest at 28 of 28."""
    if n <= 0:
        return None
    from scipy.stats import binomtest

    found = binomtest(int(correct), int(n)).proportion_ci(confidence, method="wilson")
    return float(found.low), float(found.high)


def format_accuracy(
    accuracy: float | None, interval: list[float] | tuple[float, float] | None = None,
    n: int | None = None, digits: int = 3, interval_digits: int | None = None,
) -> str:  # fmt: skip
    """``0.912 (0.885-0.934, n=467)``; ``-`` when there is no accuracy. ``interval_digits``:
    the interval's (default: ``digits``), e.g. 2 for a table that must fit 80 columns."""
    if accuracy is None:
        return "-"
    text = f"{accuracy:.{digits}f}"
    if interval:
        places = digits if interval_digits is None else interval_digits
        text += f" ({interval[0]:.{places}f}-{interval[1]:.{places}f}"
        text += f", n={n})" if n is not None else ")"
    elif n is not None:
        text += f" (n={n})"
    return text


def accuracy_text(metrics: dict[str, Any] | None, digits: int = 3) -> str:
    """:func:`format_accuracy` of a ``metrics.json`` (or ``wf evaluate``'s) dict."""
    metrics = metrics or {}
    return format_accuracy(metrics.get("accuracy"), metrics.get("accuracy_interval"),
                           metrics.get("n", metrics.get("examples")), digits)  # fmt: skip


def _binned(labels: np.ndarray, probs: np.ndarray, bins: int) -> list[tuple[float, float, int]]:
    """Per non-empty bin of ``bins`` equal-width bins of each image's top probability: its
    mean confidence, its accuracy and its image count."""
    labels = np.asarray(labels, np.int64)
    probs = np.asarray(probs, np.float64)
    confidence = probs.max(axis=1) if len(labels) else np.zeros(0)
    correct = probs.argmax(axis=1) == labels if len(labels) else np.zeros(0, bool)
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    return [(float(confidence[which == b].mean()), float(correct[which == b].mean()),
             int((which == b).sum())) for b in range(bins) if (which == b).any()]  # fmt: skip


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """How far confidence is from accuracy: over ``bins`` equal-width bins of each image's top
    probability, the gap between the bin's mean confidence and its accuracy, weighted by the
    share of images in the bin (Guo et al., 2017)."""
    if len(labels) == 0:
        return 0.0
    gaps = [
        n * abs(accuracy - confidence) for confidence, accuracy, n in _binned(labels, probs, bins)
    ]
    return float(sum(gaps) / len(labels))


def calibration_noise_floor(
    probs: np.ndarray, bins: int = 15, draws: int = 500, seed: int = 0
) -> float:
    """The expected calibration error that a perfectly calibrated model with these confidences
    would show on this many images: the mean ECE over ``draws`` sets of outcomes, each image
    right with the probability of its top class. ECE is biased upwards on few images (each bin's
    accuracy is a small sample), so an ECE near this number is as good as the images can show:
    235 images at 0.91 confidence give about 0.04, 2,400 about 0.012."""
    probs = np.asarray(probs, np.float64)
    if len(probs) == 0:
        return 0.0
    confidence = probs.max(axis=1)
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    right = np.random.default_rng(seed).random((draws, len(confidence))) < confidence
    total = np.zeros(draws)
    for b in np.unique(which):
        inside = which == b
        total += np.abs(right[:, inside].sum(axis=1) - confidence[inside].sum())
    return float(total.mean() / len(confidence))


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    """The reliability diagram's points: per non-empty bin, its mean confidence, accuracy and
    image count."""
    return [{"confidence": round(confidence, 6), "accuracy": round(accuracy, 6), "n": n}
            for confidence, accuracy, n in _binned(labels, probs, bins)]  # fmt: skip


def plot_reliability(curves: dict[str, list[dict[str, float]]], title: str) -> bytes:
    """Reliability diagrams (accuracy against confidence per bin, the diagonal is perfect
    calibration), one line per entry of ``curves`` (``before``/``after``), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.6, 4.2))
    figure.subplots_adjust(left=0.15, right=0.96, bottom=0.13, top=0.88)
    axis.plot([0, 1], [0, 1], ":", color="#888", label="perfect")
    for (name, points), style in zip(curves.items(), ("o--", "s-"), strict=False):
        if points:
            axis.plot([p["confidence"] for p in points], [p["accuracy"] for p in points], style,
                      label=name)  # fmt: skip
    axis.set_xlim(0, 1.02)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("confidence")
    axis.set_ylabel("accuracy")
    axis.legend(loc="upper left")
    axis.set_title(title)
    return _png(figure)


def plot_learning_curve(points: list[dict[str, Any]], title: str) -> bytes:
    """Cross-validated accuracy (with its 95% interval) against the share of labelled images,
    as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.6, 4.2))
    figure.subplots_adjust(left=0.15, right=0.96, bottom=0.13, top=0.88)
    shares = [100 * p["fraction"] for p in points]
    accuracy = [p["accuracy"] for p in points]
    low = [p["accuracy"] - p["interval"][0] for p in points]
    high = [p["interval"][1] - p["accuracy"] for p in points]
    axis.errorbar(shares, accuracy, yerr=[low, high], fmt="o-", capsize=3)
    axis.set_xlabel("labelled images used (%)")
    axis.set_ylabel("cross-validated accuracy")
    axis.set_xlim(0, 105)
    axis.set_title(title)
    return _png(figure)


def _png(figure: Any) -> bytes:
    """PNG bytes at 80 dpi. Margins are fixed by the caller (``subplots_adjust``): a layout
    engine (``tight_layout``, ``constrained``) draws the figure once more to measure it, half of
    a plot's cost, which every job pays."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()


def plot_learning_curves(history: dict[str, list[float]], title: str) -> bytes:
    """Loss and accuracy by epoch, training and validation, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.83, wspace=0.22)
    for axis, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            if history.get(key):
                epochs = range(1, len(history[key]) + 1)
                axis.plot(epochs, history[key], style, label=key)
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.legend()
    figure.suptitle(title)
    return _png(figure)


def plot_confusion_matrix(metrics: dict[str, Any], title: str) -> bytes:
    """The confusion matrix (rows: true class) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(metrics["confusion_matrix"])
    classes = metrics["classes"]
    size = 2 + 0.6 * len(classes)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    longest = max((len(str(c)) for c in classes), default=1)
    margin = min(0.45, 0.06 + 0.11 * longest / (size + 1))  # room for the rotated class names
    figure.subplots_adjust(left=margin, right=0.97, bottom=margin, top=0.9)
    image = axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axis.set_yticks(range(len(classes)), classes)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    for (row, column), value in np.ndenumerate(matrix):
        colour = "white" if value > matrix.max() / 2 else "black"
        axis.text(column, row, str(value), ha="center", va="center", color=colour)
    figure.colorbar(image)
    axis.set_title(title)
    return _png(figure)
