"""Using a trained model: classify files (`wf predict`), or score a labelled folder
(`wf evaluate`). Models, files and folders may be local paths or object-store URIs. Bad files
are reported with their reason, never fatal."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from storage.errors import SettingsError
from storage.filesystem import Location, file_location, write_bytes
from storage.names import escape_name
from tasks.abstention import LOW_CONFIDENCE, OUT_OF_DISTRIBUTION
from tasks.classifier import TrainedModel, load_trained_model
from tasks.cross_validation import expected_accuracy
from tasks.evaluation import accuracy_interval, classification_metrics
from tasks.images import ImageRejected, load_image
from workflows.datasets import UNLABELLED_FOLDERS, list_tree

BATCH = 32


@dataclass(frozen=True)
class Prediction:
    path: str
    label: str = ""
    probability: float = 0.0
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str = ""
    abstained: bool = False  # the model declined to name a class (label left empty)
    reason: str = ""  # why: "low_confidence" or "out_of_distribution"


def image_files(paths: list[str]) -> list[tuple[str, Location, str]]:
    """``(shown name, location, path)`` of each file, folders walked (hidden names skipped)."""
    files = []
    for path in paths:
        location = Location.at(path)
        kind = location.kind()
        if kind == "folder":
            tree = list_tree(path)
            files.extend((escape_name(e.path), tree.location, e.path) for e in tree.files)
        elif kind == "file":
            files.append((escape_name(path), location, location.root))
        else:
            raise SettingsError(f"{path} does not exist")
    return files


def classify(classifier: TrainedModel, files: list[tuple[str, Location, str]]) -> list[Prediction]:
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
        answers = classifier.answer(np.stack([image for _, image in chunk]))
        for (index, _), answer in zip(chunk, answers, strict=True):
            row = answer.probabilities
            best = int(row.argmax())
            results[index] = Prediction(
                files[index][0], "" if answer.abstained else classifier.classes[best],
                round(float(row[best]), 6),
                {name: round(float(p), 6) for name, p in zip(classifier.classes, row, strict=True)},
                abstained=answer.abstained, reason=answer.reason,
            )  # fmt: skip
    return [results[i] for i in range(len(files))]


@dataclass(frozen=True)
class Thresholds:
    """Abstention thresholds the user gave, each overriding the run's; ``abstain=False``: the
    model always answers."""

    min_confidence: float | None = None
    max_distance: float | None = None
    abstain: bool = True

    def apply(self, classifier: TrainedModel) -> TrainedModel:
        return classifier.with_thresholds(self.min_confidence, self.max_distance, self.abstain)


def predict_paths(
    model_path: str, paths: list[str], thresholds: Thresholds | None = None
) -> list[Prediction]:
    classifier = (thresholds or Thresholds()).apply(load_trained_model(model_path))
    return classify(classifier, image_files(paths))


def render_predictions(predictions: list[Prediction], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([asdict(p) for p in predictions], indent=2) + "\n"
    classes = next((list(p.probabilities) for p in predictions if p.probabilities), [])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "label", "probability", *[f"p_{c}" for c in classes], "abstained",
                     "reason", "error"])  # fmt: skip
    for p in predictions:
        writer.writerow([p.path, p.label, p.probability if not p.error else "",
                         *[p.probabilities.get(c, "") for c in classes],
                         "" if p.error else str(p.abstained).lower(), p.reason,
                         p.error])  # fmt: skip
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
    location, path = file_location(where)
    write_bytes(location.filesystem, path, data)


def evaluate_folder(model_path: str, folder: str, thresholds: Thresholds | None = None) -> dict:
    """Metrics of the model on ``folder`` (one sub-folder per class, named as in training):
    on every image, and on the images it answered (``answered``: accuracy with its interval,
    and the coverage) when it can abstain."""
    tree = list_tree(folder)
    classifier = (thresholds or Thresholds()).apply(load_trained_model(model_path))
    present = [c for c in tree.children() if c not in UNLABELLED_FOLDERS]  # no class to score
    unknown = [c for c in present if escape_name(c) not in classifier.classes]
    if unknown:
        raise SettingsError(
            f"{folder} has classes the model does not know: {', '.join(map(escape_name, unknown))}"
        )
    entries = [e for e in tree.files if len(e.parts) > 1 and e.parts[0] in present]
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
    # What the run's cross-validation predicted for this many images: a measured accuracy
    # outside it says these images differ from the labelled ones, or the model does.
    metrics["expected"] = expected_accuracy(classifier.cv, metrics.get("accuracy"), len(kept))
    answered = [i for i in kept if not predictions[i].abstained]
    predicted = dict(zip(kept, probs.reshape(len(kept), -1).argmax(axis=1), strict=True))
    right = sum(1 for i in answered if predicted[i] == labels[i])
    interval = accuracy_interval(right, len(answered))
    metrics["answered"] = {
        "accuracy": round(right / len(answered), 6) if answered else None,
        "accuracy_interval": [round(v, 6) for v in interval] if interval else None,
        "n": len(answered),
        "coverage": round(len(answered) / len(kept), 6) if kept else None,
        "abstained": {reason: sum(1 for i in kept if predictions[i].reason == reason)
                      for reason in (LOW_CONFIDENCE, OUT_OF_DISTRIBUTION)},
        "thresholds": classifier.abstention.to_json() if classifier.abstention else None,
    }  # fmt: skip
    return metrics
