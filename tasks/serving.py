"""Serving trained classifiers on Ray Serve: one deployment per model, batched, behind one
HTTP gateway.

Why one deployment per model rather than ``@serve.multiplexed`` replicas: a runs folder holds a
handful of models (datasets x methods), each small enough to keep loaded; a deployment of its
own gives each model its own request batching (``@serve.batch`` gathers requests of one model,
which multiplexing cannot), its own replica count and autoscaling, and its own bounded queue,
so one busy model does not slow or reject another's requests.

The :class:`Classifier` deployment decodes image bytes with the same function as extraction
and ``wf predict`` and runs the same forward pass (``tasks/classifier.py``): HTTP answers equal
``wf predict``'s (tested to 1e-6). The :class:`Gateway` (FastAPI) routes, checks sizes, and
turns every failure into one line of JSON with its status: 400 not an image, 413 too large or a
decompression bomb, 404 unknown model, 503 over capacity.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from tasks.classifier import Answer
from tasks.images import ImageRejected, decode_image

MAX_BODY_BYTES = 20 * 1024 * 1024


@dataclass(frozen=True)
class ModelFacts:
    """What the gateway knows of a served model, from its artifacts."""

    dataset: str
    method: str
    model_uri: str
    classes: tuple[str, ...]
    sha256: str
    input_size: tuple[int, int]
    metrics: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.method}"

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "method": self.method, "sha256": self.sha256}


class Rejected(Exception):
    """A request the server refuses: ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message

    def __reduce__(self) -> tuple:  # it crosses from a replica to the gateway
        return (Rejected, (self.status, self.message))


def rejection(error: ImageRejected) -> Rejected:
    status = 413 if error.reason == "too_large" else 400
    return Rejected(status, f"{error.reason}: {error.detail}")


@serve.deployment
class Classifier:
    """One model's replica: requests of one image each, batched into one forward pass."""

    def __init__(self, model_uri: str, max_pixels: int, batch_size: int, wait_s: float) -> None:
        from tasks.classifier import load_classifier

        self.classifier = load_classifier(model_uri)
        self.max_pixels = max_pixels
        self.predict.set_max_batch_size(batch_size)
        self.predict.set_batch_wait_timeout_s(wait_s)

    def _decode(self, item: bytes | np.ndarray) -> np.ndarray:
        if isinstance(item, np.ndarray):
            return item
        return decode_image(item, self.classifier.input_size, self.max_pixels)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict(self, items: list[bytes | np.ndarray]) -> list[Answer | Rejected]:
        """Probabilities of each image (encoded bytes, or decoded pixels of the model's size)
        and whether the model abstains, or the reason it was refused; the good ones go through
        the model together."""
        results: list[Any] = [None] * len(items)
        good, pixels = [], []
        for index, item in enumerate(items):
            try:
                pixels.append(self._decode(item))
                good.append(index)
            except ImageRejected as error:
                results[index] = rejection(error)
        if good:
            for index, answer in zip(good, self.classifier.answer(np.stack(pixels)), strict=True):
                results[index] = Answer(answer.probabilities.astype(np.float64), answer.abstained,
                                        answer.reason)  # fmt: skip
        return results


def decode_tensor_input(entry: dict[str, Any], size: tuple[int, int]) -> list[bytes | np.ndarray]:
    """The images of one Open Inference Protocol input: ``BYTES`` (base64 of image files) or a
    ``UINT8`` tensor of shape ``[n, height, width, 3]`` at the model's input size."""
    datatype, data = entry.get("datatype"), entry.get("data")
    if not isinstance(data, list):
        raise Rejected(400, "input 'data' must be a list")
    if datatype == "BYTES":
        try:
            return [base64.b64decode(item, validate=True) for item in data]
        except (ValueError, TypeError):
            raise Rejected(400, "BYTES input must be base64 strings of image files") from None
    if datatype == "UINT8":
        shape = entry.get("shape")
        if not (isinstance(shape, list) and len(shape) == 4 and shape[1:] == [*size, 3]):
            raise Rejected(
                400, f"UINT8 input must have shape [n, {size[0]}, {size[1]}, 3], not {shape}"
            )
        try:
            array = np.asarray(data, dtype=np.uint8).reshape(shape)
        except (ValueError, TypeError, OverflowError):
            raise Rejected(400, f"UINT8 data does not fit shape {shape}") from None
        return list(array)
    raise Rejected(400, f"datatype must be BYTES or UINT8, not {datatype!r}")
