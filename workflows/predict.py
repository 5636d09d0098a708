"""Using a trained model: classify files (`wf predict`), or score a labelled folder
(`wf evaluate`). Models, files and folders may be local paths or object-store URIs. Bad files
are reported with their reason, never fatal."""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from dataclasses import asdict, dataclass, field

import numpy as np

from storage.errors import SettingsError
from storage.filesystem import Location, file_info, write_bytes
from storage.names import escape_name
from tasks.classifier import Classifier, load_classifier
from tasks.evaluation import classification_metrics
from tasks.images import ImageRejected, load_image
from workflows.datasets import list_tree

BATCH = 32


@dataclass(frozen=True)
class Prediction:
    path: str
    label: str = ""
    probability: float = 0.0
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str = ""


def image_files(paths: list[str]) -> list[tuple[str, Location, str]]:
    """``(shown name, location, path)`` of each file, folders walked (hidden names skipped)."""
    files = []
    for path in paths:
        location = Location.at(path)
        info = file_info(location.filesystem, location.root) if not location.is_local else None
        if (location.is_local and os.path.isdir(location.root)) or (
            info and info.type.name == "Directory"
        ):
            tree = list_tree(path)
            files.extend((escape_name(e.path), tree.location, e.path) for e in tree.files)
        elif os.path.lexists(location.root) if location.is_local else info is not None:
            files.append((escape_name(path), location, location.root))
        else:
            raise SettingsError(f"{path} does not exist")
    return files


def classify(classifier: Classifier, files: list[tuple[str, Location, str]]) -> list[Prediction]:
    size = classifier.input_size
    results: dict[int, Prediction] = {}
    good: list[tuple[int, np.ndarray]] = []
    for index, (shown, location, path) in enumerate(files):
        try:
            good.append((index, load_image(location.filesystem, path, size)))
        except ImageRejected as rejected:
            results[index] = Prediction(shown, error=f"{rejected.reason}: {rejected.detail}")
    for start in range(0, len(good), BATCH):
        chunk = good[start : start + BATCH]
        rows = classifier.probabilities(np.stack([image for _, image in chunk]))
        for (index, _), row in zip(chunk, rows, strict=True):
            best = int(row.argmax())
            results[index] = Prediction(
                files[index][0], classifier.classes[best], round(float(row[best]), 6),
                {name: round(float(p), 6) for name, p in zip(classifier.classes, row, strict=True)},
            )  # fmt: skip
    return [results[i] for i in range(len(files))]


def predict_paths(model_path: str, paths: list[str]) -> list[Prediction]:
    return classify(load_classifier(model_path), image_files(paths))


def render_predictions(predictions: list[Prediction], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([asdict(p) for p in predictions], indent=2) + "\n"
    classes = next((list(p.probabilities) for p in predictions if p.probabilities), [])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "label", "probability", *[f"p_{c}" for c in classes], "error"])
    for p in predictions:
        writer.writerow([p.path, p.label, p.probability if not p.error else "",
                         *[p.probabilities.get(c, "") for c in classes], p.error])  # fmt: skip
    return buffer.getvalue()


def write_predictions(predictions: list[Prediction], output: str | None, fmt: str | None) -> str:
    """Render as CSV or JSON; write to ``output`` (a path or URI) when given. Returns the text."""
    fmt = fmt or (os.path.splitext(output)[1].lstrip(".") if output else "csv")
    if fmt not in ("csv", "json"):
        raise SettingsError(f"--format must be csv or json, not {fmt!r}")
    text = render_predictions(predictions, fmt)
    if output:
        write_output(output, text.encode())
    return text


def write_output(where: str, data: bytes) -> None:
    """Write a result file the user named: a local path or a URI."""
    folder, name = (posixpath.dirname(where), posixpath.basename(where)) if "://" in where else (
        os.path.dirname(os.path.abspath(where)), os.path.basename(where))  # fmt: skip
    location = Location.at(folder)
    write_bytes(location.filesystem, location.path(name), data)


def evaluate_folder(model_path: str, folder: str) -> dict:
    """Metrics of the model on ``folder`` (one sub-folder per class, named as in training)."""
    tree = list_tree(folder)
    classifier = load_classifier(model_path)
    present = tree.children()
    unknown = [c for c in present if escape_name(c) not in classifier.classes]
    if unknown:
        raise SettingsError(
            f"{folder} has classes the model does not know: {', '.join(map(escape_name, unknown))}"
        )
    entries = [e for e in tree.files if len(e.parts) > 1]
    files = [(escape_name(e.path), tree.location, e.path) for e in entries]
    labels = [classifier.classes.index(escape_name(e.parts[0])) for e in entries]
    predictions = classify(classifier, files)
    kept = [i for i, p in enumerate(predictions) if not p.error]
    probs = np.array([[predictions[i].probabilities[c] for c in classifier.classes] for i in kept])
    metrics = classification_metrics(
        np.array([labels[i] for i in kept], dtype=np.int64),
        probs.reshape(-1, len(classifier.classes)), classifier.classes,
    )  # fmt: skip
    metrics["rejects"] = [{"path": p.path, "error": p.error} for p in predictions if p.error]
    return metrics
