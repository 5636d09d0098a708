"""A trained classifier as users run it: the saved Keras model and its classes, loaded from a
path or URI, and the one forward pass that `wf predict`, `wf evaluate` and `wf serve` share
(same decoding, same resizing, same numbers)."""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from storage.errors import StoreError
from storage.filesystem import Location, file_info, read_bytes
from storage.hashing import sha256_stream
from storage.runs import Artifact
from tasks.heads import probabilities


@dataclass(frozen=True)
class Classifier:
    model: Any
    classes: list[str]
    sha256: str  # of model.keras

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(int(d) for d in self.model.input_shape[1:3])  # type: ignore[return-value]

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, classes)`` of decoded images ``(n, h, w, 3)`` uint8."""
        outputs = self.model.predict_on_batch(np.asarray(pixels, np.float32))
        return probabilities(outputs, len(self.classes))


def load_classifier(model_path: str) -> Classifier:
    """The Keras 3 model at ``model_path`` (a path or URI) and its class names (``classes.json``
    beside it); anything that stops it loading is one :class:`StoreError`."""
    folder = posixpath.dirname(model_path) if "://" in model_path else os.path.dirname(
        os.path.abspath(model_path))  # fmt: skip
    location, name = Location.at(folder), posixpath.basename(model_path)
    if file_info(location.filesystem, location.path(name)) is None:
        raise StoreError(f"model {model_path} does not exist")
    try:
        classes = json.loads(read_bytes(location.filesystem, location.path(Artifact.CLASSES)))
    except FileNotFoundError:
        raise StoreError(f"no classes.json beside {model_path}") from None
    except ValueError as error:
        raise StoreError(f"classes.json beside {model_path} is not valid JSON: {error}") from None
    if not isinstance(classes, list):
        raise StoreError(f"classes.json beside {model_path} is not a list")
    data = read_bytes(location.filesystem, location.path(name))
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
    return Classifier(model, [str(c) for c in classes], sha256_stream([data]))
