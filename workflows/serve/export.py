"""``wf export``: a trained ``model.keras`` as ONNX, TFLite or fully quantised int8 TFLite, with
a parity gate.

The file is written only when it gives the Keras model's answers on labelled images (``--check
FOLDER``, by default the dataset's ``validation`` folder): top-1 agreement at least
:data:`MIN_AGREEMENT` for ``onnx`` and ``tflite``; for ``tflite-int8`` (int8 weights and
activations, float32 in and out, calibrated on the dataset's training images), accuracy within
:data:`INT8_MAX_ACCURACY_DROP` of Keras's and no class's recall more than
:data:`INT8_MAX_CLASS_DROP` lower (conversions that collapse to one class are refused). The
numbers are reported either way. Every exported model takes what ``model.keras`` takes, RGB
pixels in [0, 255] of its input size (preprocessing inside), as ``image``, and gives its output,
``probabilities`` (one sigmoid unit for two classes, else a softmax); it runs in onnxruntime or
LiteRT with nothing of wf or TensorFlow installed.

The conversions are :mod:`tasks.converters`'s (ONNX through Keras's own
``model.export(format="onnx")``, TFLite through ``tf.lite.TFLiteConverter``).
"""

from __future__ import annotations

import contextlib
import json
import posixpath
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from storage.errors import RunFailed, SettingsError
from storage.filesystem import Location, file_info, file_location, read_bytes
from storage.hashing import stable_unit_interval
from storage.names import escape_name
from storage.runs import Artifact
from tasks.converters import FORMATS, convert, run_exported
from tasks.heads import probabilities
from tasks.images import ImageRejected, load_image
from workflows.datasets import UNLABELLED_FOLDERS, list_tree
from workflows.serve.predict import write_output

MIN_AGREEMENT = 0.995
INT8_MAX_ACCURACY_DROP = 0.005
INT8_MAX_CLASS_DROP = 0.02
CALIBRATION_IMAGES = 100


@dataclass(frozen=True)
class ExportReport:
    """What ``wf export`` measured, and whether it wrote the file."""

    format: str
    output: str
    written: bool
    images: int  # the labelled images checked
    agreement: float  # top-1 agreement with the Keras model
    max_probability_difference: float
    keras_accuracy: float
    exported_accuracy: float
    worst_class: str  # the class whose recall fell most
    worst_class_drop: float
    bytes: int
    reason: str = ""  # why it was not written

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def export_model(
    model_path: str, fmt: str, output: str, check: str | None = None,
    calibration: str | None = None,
) -> ExportReport:  # fmt: skip
    """Convert ``model_path`` to ``fmt``, check it on ``check`` and write it to ``output`` when
    it passes; a model it refuses raises :class:`ExportRefused` holding the report."""
    from tasks.classifier import load_trained_model

    if fmt not in FORMATS:
        raise SettingsError(f"--format must be one of {', '.join(FORMATS)}: {fmt}")
    if model_path.endswith(".onnx"):
        raise SettingsError(f"{model_path} is already ONNX (a job on an ONNX backbone): use it")
    classifier = load_trained_model(model_path)
    root = _dataset_root(model_path)
    check = check or _default(root, "validation", "--check FOLDER (a labelled folder)")
    pixels, labels = labelled_images(check, classifier.classes, classifier.input_size)
    expected = classifier.probabilities(pixels)
    if fmt == "tflite-int8":
        where = calibration or _default(root, "train", "--calibration FOLDER (training images)")
        sample = calibration_images(where, classifier.input_size)
    else:
        sample = None
    data = convert(classifier.model, fmt, sample)
    found = probabilities(run_exported(data, fmt, pixels), len(classifier.classes))
    report = compare(fmt, output, expected, found, labels, classifier.classes, len(data))
    if not report.written:
        raise ExportRefused(report)
    write_output(output, data)
    return report


class ExportRefused(RunFailed):
    """The exported model did not give the Keras model's answers: nothing was written."""

    def __init__(self, report: ExportReport) -> None:
        super().__init__(f"not written: {report.reason}")
        self.report = report


def _dataset_root(model_path: str) -> str | None:
    """The dataset root the model's job recorded in ``settings.json`` beside it."""
    location, model = file_location(model_path)
    path = posixpath.join(posixpath.dirname(model), Artifact.SETTINGS)
    if file_info(location.filesystem, path) is None:
        return None
    try:
        return json.loads(read_bytes(location.filesystem, path)).get("dataset_root")
    except (ValueError, AttributeError):
        return None


def _default(root: str | None, split: str, option: str) -> str:
    if root:
        location = Location.at(root)
        info = file_info(location.filesystem, location.path(split))
        if info is not None and info.type.name == "Directory":
            return f"{root.rstrip('/')}/{split}"
    raise SettingsError(f"the model's dataset has no {split}/ folder: name one with {option}")


def labelled_images(
    folder: str, classes: list[str], size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Every decodable image of a labelled folder (one sub-folder per class), decoded to
    ``size``, and its class index; unreadable files are left out."""
    tree = list_tree(folder)
    present = [c for c in tree.children() if c not in UNLABELLED_FOLDERS]
    unknown = [c for c in present if escape_name(c) not in classes]
    if unknown:
        raise SettingsError(
            f"{folder} has classes the model does not know: {', '.join(map(escape_name, unknown))}"
        )
    pixels, labels = [], []
    for entry in tree.files:
        if len(entry.parts) < 2 or entry.parts[0] not in present:
            continue
        try:
            pixels.append(load_image(tree.location.filesystem, entry.path, size))
        except ImageRejected:
            continue
        labels.append(classes.index(escape_name(entry.parts[0])))
    if not pixels:
        raise SettingsError(f"{folder} has no image to check the exported model on")
    return np.stack(pixels).astype(np.float32), np.array(labels)


def calibration_images(folder: str, size: tuple[int, int]) -> np.ndarray:
    """Up to :data:`CALIBRATION_IMAGES` images under ``folder``, the same ones every time."""
    tree = list_tree(folder)
    entries = sorted(tree.files, key=lambda e: stable_unit_interval("/".join(e.parts), "wf-export"))
    images = []
    for entry in entries:
        with contextlib.suppress(ImageRejected):
            images.append(load_image(tree.location.filesystem, entry.path, size))
        if len(images) == CALIBRATION_IMAGES:
            break
    if not images:
        raise SettingsError(f"{folder} has no image to calibrate the int8 model on")
    return np.stack(images).astype(np.float32)


def compare(
    fmt: str, output: str, expected: np.ndarray, found: np.ndarray, labels: np.ndarray,
    classes: list[str], size: int,
) -> ExportReport:  # fmt: skip
    """The parity gate's numbers and verdict."""
    agree = float(np.mean(expected.argmax(1) == found.argmax(1)))
    keras_right, exported_right = expected.argmax(1) == labels, found.argmax(1) == labels
    drops = {
        c: float(keras_right[labels == i].mean() - exported_right[labels == i].mean())
        for i, c in enumerate(classes) if np.any(labels == i)
    }  # fmt: skip
    worst = max(drops, key=lambda c: drops[c])
    accuracy_keras, accuracy_exported = float(keras_right.mean()), float(exported_right.mean())
    reason = ""
    if fmt == "tflite-int8":
        if accuracy_keras - accuracy_exported > INT8_MAX_ACCURACY_DROP:
            reason = (f"int8 accuracy {accuracy_exported:.4f} against Keras's {accuracy_keras:.4f}"
                      f" (more than {INT8_MAX_ACCURACY_DROP * 100:g} points lower)")  # fmt: skip
        elif drops[worst] > INT8_MAX_CLASS_DROP:
            reason = (f"class {worst}'s recall is {drops[worst] * 100:.1f} points lower (more "
                      f"than {INT8_MAX_CLASS_DROP * 100:g})")  # fmt: skip
    elif agree < MIN_AGREEMENT:
        reason = f"top-1 agreement {agree:.4f} with the Keras model, below {MIN_AGREEMENT}"
    return ExportReport(
        format=fmt, output=output, written=not reason, images=len(labels), agreement=agree,
        max_probability_difference=float(np.abs(expected - found).max()),
        keras_accuracy=accuracy_keras, exported_accuracy=accuracy_exported, worst_class=worst,
        worst_class_drop=drops[worst], bytes=size, reason=reason,
    )  # fmt: skip
