"""Using a trained model: classify files (`wf predict`), or score a labelled folder
(`wf evaluate`). Bad files are reported with their reason, never fatal."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field

import numpy as np

from storage.artifacts import read_json
from storage.errors import SettingsError, StoreError
from tasks.evaluation import classification_metrics
from tasks.heads import probabilities
from tasks.images import ImageRejected, decode_image, is_ignored_file

BATCH = 32


@dataclass(frozen=True)
class Prediction:
    path: str
    label: str = ""
    probability: float = 0.0
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str = ""


def load_classifier(model_path: str) -> tuple[object, list[str]]:
    """The Keras 3 model and its class names (``classes.json`` beside it)."""
    if not os.path.isfile(model_path):
        raise StoreError(f"model {model_path} does not exist")
    classes = read_json(os.path.join(os.path.dirname(os.path.abspath(model_path)), "classes.json"))
    import keras

    return keras.saving.load_model(model_path, compile=False), list(classes)


def image_files(paths: list[str]) -> list[str]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            for current, directories, names in os.walk(path):
                directories[:] = sorted(d for d in directories if not is_ignored_file(d))
                files.extend(
                    os.path.join(current, n) for n in sorted(names) if not is_ignored_file(n)
                )
        elif os.path.exists(path):
            files.append(path)
        else:
            raise SettingsError(f"{path} does not exist")
    return files


def _classify(model: object, classes: list[str], files: list[str]) -> list[Prediction]:
    size = tuple(int(d) for d in model.input_shape[1:3])  # type: ignore[attr-defined]
    results: dict[int, Prediction] = {}
    good: list[tuple[int, np.ndarray]] = []
    for index, path in enumerate(files):
        try:
            with open(path, "rb") as handle:
                good.append((index, decode_image(handle.read(), size)))
        except ImageRejected as rejected:
            results[index] = Prediction(path, error=f"{rejected.reason}: {rejected.detail}")
        except OSError as error:
            results[index] = Prediction(path, error=f"unreadable: {error}")
    for start in range(0, len(good), BATCH):
        chunk = good[start : start + BATCH]
        pixels = np.stack([image for _, image in chunk]).astype(np.float32)
        probs = probabilities(model.predict(pixels, verbose=0), len(classes))  # type: ignore[attr-defined]
        for (index, _), row in zip(chunk, probs, strict=True):
            best = int(row.argmax())
            results[index] = Prediction(
                files[index],
                classes[best],
                round(float(row[best]), 6),
                {name: round(float(p), 6) for name, p in zip(classes, row, strict=True)},
            )
    return [results[i] for i in range(len(files))]


def predict_paths(model_path: str, paths: list[str]) -> list[Prediction]:
    model, classes = load_classifier(model_path)
    return _classify(model, classes, image_files(paths))


def write_predictions(predictions: list[Prediction], output: str | None, fmt: str | None) -> str:
    """Render as CSV or JSON; write to ``output`` when given. Returns the text."""
    fmt = fmt or (os.path.splitext(output)[1].lstrip(".") if output else "csv")
    if fmt not in ("csv", "json"):
        raise SettingsError(f"--format must be csv or json, not {fmt!r}")
    if fmt == "json":
        text = json.dumps([p.__dict__ for p in predictions], indent=2) + "\n"
    else:
        classes = next((list(p.probabilities) for p in predictions if p.probabilities), [])
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "label", "probability", *[f"p_{c}" for c in classes], "error"])
        for p in predictions:
            writer.writerow(
                [
                    p.path,
                    p.label,
                    p.probability if not p.error else "",
                    *[p.probabilities.get(c, "") for c in classes],
                    p.error,
                ]
            )
        text = buffer.getvalue()
    if output:
        with open(output, "w") as handle:
            handle.write(text)
    return text


def evaluate_folder(model_path: str, folder: str) -> dict:
    """Metrics of the model on ``folder`` (one sub-folder per class, named as in training)."""
    model, classes = load_classifier(model_path)
    if not os.path.isdir(folder):
        raise SettingsError(f"{folder} is not a folder")
    present = sorted(
        e.name for e in os.scandir(folder) if e.is_dir() and not is_ignored_file(e.name)
    )
    unknown = [c for c in present if c not in classes]
    if unknown:
        raise SettingsError(f"{folder} has classes the model does not know: {', '.join(unknown)}")
    files, labels = [], []
    for name in present:
        found = image_files([os.path.join(folder, name)])
        files.extend(found)
        labels.extend([classes.index(name)] * len(found))
    predictions = _classify(model, classes, files)
    kept = [i for i, p in enumerate(predictions) if not p.error]
    probs = np.array([[predictions[i].probabilities[c] for c in classes] for i in kept]).reshape(
        -1, len(classes)
    )
    metrics = classification_metrics(
        np.array([labels[i] for i in kept], dtype=np.int64), probs, classes
    )
    metrics["rejects"] = [{"path": p.path, "error": p.error} for p in predictions if p.error]
    return metrics
