"""Classification metrics and plots, from labels and class probabilities."""

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
    return {
        "accuracy": round(float((predicted == labels).mean()) if len(labels) else 0.0, 6),
        "loss": round(float(-np.log(chosen).mean()) if len(labels) else 0.0, 6),
        "examples": len(labels),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "classes": list(classes),
    }


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
