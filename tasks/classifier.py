"""A trained classifier as users run it: the saved Keras model (or ``model.onnx``, in
onnxruntime, for a job on an ONNX backbone) and its classes, loaded from a path or URI, and the
one forward pass that `wf predict`, `wf evaluate` and `wf serve` share (same decoding, same
resizing, same numbers)."""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from storage.errors import SettingsError, StoreError
from storage.filesystem import Location, file_info, file_location, first_line, read_bytes
from storage.hashing import sha256_stream
from storage.runs import Artifact, JobMetrics
from tasks.abstention import (
    Abstention,
    bank_from_bytes,
    embedding_model,
    nearest_distance,
)
from tasks.audit import normalise
from tasks.heads import probabilities
from tasks.methods import METHODS


@dataclass(frozen=True)
class Answer:
    """One image's class probabilities and whether the model declines to name a class."""

    probabilities: np.ndarray
    abstained: bool = False
    reason: str = ""  # "low_confidence", "out_of_distribution" or ""


@dataclass(frozen=True)
class TrainedModel:
    model: Any
    classes: list[str]
    sha256: str  # of model.keras
    abstention: Abstention | None = None  # the thresholds in force (None: always answers)
    bank: np.ndarray | None = None  # the labelled images' embeddings
    embedding: Any = None  # the model with its embedding as a second output
    runtime: str = "keras"  # or "onnxruntime": model.onnx, or model.keras exported at load
    cv: dict[str, Any] | None = None  # its run's cross-validation (metrics.json "cv"), if any

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(int(d) for d in self.model.input_shape[1:3])  # type: ignore[return-value]

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, classes)`` of decoded images ``(n, h, w, 3)`` uint8."""
        outputs = self.model.predict_on_batch(np.asarray(pixels, np.float32))
        return probabilities(outputs, len(self.classes))

    def answer(self, pixels: np.ndarray) -> list[Answer]:
        """Each image's probabilities and, with thresholds, whether it abstains and why: one
        forward pass for the probabilities and the embedding."""
        if self.abstention is None:
            return [Answer(row) for row in self.probabilities(pixels)]
        distance = None
        if self.embedding is not None and self.bank is not None:
            outputs, embedded = self.embedding.predict_on_batch(np.asarray(pixels, np.float32))
            found = probabilities(outputs, len(self.classes))
            distance = nearest_distance(normalise(np.asarray(embedded)), self.bank)
        else:
            found = self.probabilities(pixels)
        return [Answer(row, abstained, reason) for row, (abstained, reason) in
                zip(found, self.abstention.decide(found, distance), strict=True)]  # fmt: skip

    def on_onnxruntime(self) -> tuple[TrainedModel, str]:
        """This classifier with its Keras model (and its embedding output, when it abstains by
        distance) exported to one ONNX graph run in onnxruntime: about 2.5x Keras's
        ``predict_on_batch`` for EfficientNet-Lite0 with its top at batch 1 and 8 on 2 cores.
        Checked against Keras on four seeded random images; where the export fails or differs
        by more than 1e-3, the classifier is returned unchanged with the reason."""
        from tasks.backbones.onnx_backbone import OnnxModel
        from tasks.converters import EMBEDDING_NAME, OUTPUT_NAME, to_onnx

        if self.runtime != "keras":
            return self, ""
        source = self.model if self.embedding is None else self.embedding
        outputs = (OUTPUT_NAME,) if self.embedding is None else (OUTPUT_NAME, EMBEDDING_NAME)
        try:
            exported = OnnxModel(to_onnx(source, outputs))
        except Exception as error:  # tf2onnx and onnxruntime raise many kinds
            first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            return self, f"kept Keras: the ONNX export failed ({type(error).__name__}: {first})"
        pixels = np.random.default_rng(0).uniform(0, 255, (4, *self.input_size, 3))
        pixels = pixels.astype(np.float32)
        difference = float(np.abs(np.asarray(self.model.predict_on_batch(pixels))
                                  - exported.predict_on_batch(pixels)).max())  # fmt: skip
        if difference > 1e-3:
            return self, f"kept Keras: the ONNX export differs by {difference:.1e}"
        embedding = None if self.embedding is None else exported.with_embedding()
        return dataclasses.replace(self, model=exported, embedding=embedding,
                                   runtime="onnxruntime"), ""  # fmt: skip

    def with_thresholds(
        self, min_confidence: float | None = None, max_distance: float | None = None,
        abstain: bool = True,
    ) -> TrainedModel:  # fmt: skip
        """This classifier with thresholds the user gave (each overrides the run's), or none
        (``abstain=False``)."""
        if not abstain:
            return dataclasses.replace(self, abstention=None)
        if min_confidence is None and max_distance is None:
            return self
        base = self.abstention or Abstention(0.0, None, 0.0, "options", 0)
        if max_distance is not None and self.embedding is None:
            raise SettingsError("--max-distance needs the run's embeddings.npy beside the model")
        return dataclasses.replace(self, abstention=dataclasses.replace(
            base, chosen_on="options",
            min_confidence=base.min_confidence if min_confidence is None else min_confidence,
            max_distance=base.max_distance if max_distance is None else max_distance))  # fmt: skip


def load_trained_model(model_path: str) -> TrainedModel:
    """The Keras 3 model at ``model_path`` (a path or URI) and its class names (``classes.json``
    beside it); anything that stops it loading is one :class:`StoreError`."""
    location, path = file_location(model_path)
    name = posixpath.basename(path)
    if file_info(location.filesystem, path) is None:
        raise StoreError(f"model {model_path} does not exist")
    try:
        classes = json.loads(read_bytes(location.filesystem, location.path(Artifact.CLASSES)))
    except FileNotFoundError:
        raise StoreError(f"no classes.json beside {model_path}") from None
    except ValueError as error:
        raise StoreError(f"classes.json beside {model_path} is not valid JSON: {error}") from None
    if not isinstance(classes, list):
        raise StoreError(f"classes.json beside {model_path} is not a list")
    data = read_bytes(location.filesystem, path)
    if name.endswith(".onnx"):
        model = _onnx_model(data, model_path)
    else:
        model = _keras_model(data, model_path)
    metrics = _run_metrics(location)
    abstention, bank, embedding = _abstention(location, model, model_path, metrics)
    runtime = "onnxruntime" if name.endswith(".onnx") else "keras"
    return TrainedModel(model, [str(c) for c in classes], sha256_stream([data]), abstention, bank,
                        embedding, runtime, metrics.cv if metrics else None)  # fmt: skip


def _onnx_model(data: bytes, model_path: str) -> Any:
    """A ``model.onnx`` (a job on an ONNX backbone) in onnxruntime."""
    from tasks.backbones.onnx_backbone import OnnxModel

    try:
        return OnnxModel(data)
    except SettingsError:
        raise
    except Exception as error:  # onnxruntime's own errors: all mean "cannot load"
        raise StoreError(f"cannot load model {model_path}: {first_line(error)}") from None


def _keras_model(data: bytes, model_path: str) -> Any:
    import keras

    with tempfile.TemporaryDirectory() as temporary:
        local = os.path.join(temporary, Artifact.MODEL)
        with open(local, "wb") as handle:
            handle.write(data)
        try:
            model = keras.saving.load_model(local, compile=False)
        except Exception as error:  # Keras raises many kinds; all mean "cannot load"
            first = str(error).strip().splitlines()[0][:240] if str(error).strip() else ""
            raise StoreError(
                f"cannot load model {model_path}: {type(error).__name__}: {first}"
            ) from None
    return model


def _run_metrics(location: Location) -> JobMetrics | None:
    """The ``metrics.json`` beside the model, when its run wrote one that reads as JSON."""
    try:
        value = json.loads(read_bytes(location.filesystem, location.path(Artifact.METRICS)))
    except (FileNotFoundError, ValueError):
        return None
    return JobMetrics.from_json(value if isinstance(value, dict) else {})


def _abstention(
    location: Location, model: Any, model_path: str, metrics: JobMetrics | None
) -> tuple[Any, Any, Any]:
    """The run's abstention thresholds (``metrics.json``'s ``abstain``), the labelled images'
    embeddings and the two-output model, when the model's run has them."""
    import keras

    if metrics is None:
        return None, None, None
    abstention = Abstention.from_json(metrics.abstain)
    method = metrics.method
    if abstention is None or method not in METHODS or not METHODS[method].embedding_layer:
        return abstention, None, None
    try:
        bank = bank_from_bytes(read_bytes(location.filesystem, location.path(Artifact.EMBEDDINGS)))
        layer = METHODS[method].embedding_layer
        if hasattr(model, "with_embedding"):  # model.onnx has its embedding as an output
            embedding = model.with_embedding()
        else:
            embedding = embedding_model(keras, model, layer)
    except FileNotFoundError:
        return dataclasses.replace(abstention, max_distance=None), None, None
    except ValueError as error:
        raise StoreError(f"cannot read the embeddings beside {model_path}: {error}") from None
    return abstention, bank, embedding
