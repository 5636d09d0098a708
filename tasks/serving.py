"""Serving trained classifiers on Ray Serve: one deployment per model, batched, behind one
HTTP gateway.

Why one deployment per model rather than ``@serve.multiplexed`` replicas: a runs folder holds a
handful of models (datasets x methods), each small enough to keep loaded; a deployment of its
own gives each model its own request batching (``@serve.batch`` gathers requests of one model,
which multiplexing cannot), its own replica count and autoscaling, and its own bounded queue,
so one busy model does not slow or reject another's requests.

The :class:`ModelDeployment` decodes image bytes with the same function as extraction
and ``wf predict`` and runs the same forward pass (``tasks/classifier.py``): HTTP answers equal
``wf predict``'s (tested to 1e-6). The :class:`Gateway` (FastAPI) routes, checks sizes, and
turns every failure into one line of JSON with its status: 400 not an image, 413 too large or a
decompression bomb, 404 unknown model, 503 over capacity.
"""

from __future__ import annotations

import base64
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from storage.runs import job_run_name
from tasks.classifier import Answer
from tasks.images import ImageRejected, decode_image


@dataclass(frozen=True)
class ServedModel:
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
        return job_run_name(self.dataset, self.method)

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
class ModelDeployment:
    """One model's replica: requests of one image each, batched into one forward pass."""

    def __init__(self, model_uri: str, max_pixels: int, batch_size: int, wait_s: float,
                 runtime: str = "onnx") -> None:  # fmt: skip
        from tasks.classifier import load_trained_model

        self.classifier = load_trained_model(model_uri)
        if runtime == "onnx":
            self.classifier, kept = self.classifier.on_onnxruntime()
            if kept:  # in the replica's log
                print(f"{model_uri}: {kept}", file=sys.stderr, flush=True)
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


def decode_tensor_input(
    entry: dict[str, Any], size: tuple[int, int], binary: bytes | None = None
) -> list[bytes | np.ndarray]:
    """The images of one Open Inference Protocol input: ``BYTES`` (image files: base64 strings
    in JSON, or raw in the binary tensor extension) or a ``UINT8`` tensor of shape ``[n,
    height, width, 3]`` at the model's input size. ``binary``: the input's bytes when it came
    in the binary extension (``parameters.binary_data_size``), else None (``data`` in JSON)."""
    datatype, data, shape = entry.get("datatype"), entry.get("data"), entry.get("shape")
    if binary is None and not isinstance(data, list):
        raise Rejected(400, "input 'data' must be a list")
    if datatype == "BYTES":
        if binary is not None:
            return unpack_bytes(binary)
        try:
            return [base64.b64decode(item, validate=True) for item in data]
        except (ValueError, TypeError):
            raise Rejected(400, "BYTES input must be base64 strings of image files") from None
    if datatype == "UINT8":
        if not (isinstance(shape, list) and len(shape) == 4 and shape[1:] == [*size, 3]):
            raise Rejected(
                400, f"UINT8 input must have shape [n, {size[0]}, {size[1]}, 3], not {shape}"
            )
        try:
            if binary is not None:
                array = np.frombuffer(binary, dtype=np.uint8).reshape(shape)
            else:
                array = np.asarray(data, dtype=np.uint8).reshape(shape)
        except (ValueError, TypeError, OverflowError):
            raise Rejected(400, f"UINT8 data does not fit shape {shape}") from None
        return list(array)
    raise Rejected(400, f"datatype must be BYTES or UINT8, not {datatype!r}")


def unpack_bytes(data: bytes) -> list[bytes]:
    """A ``BYTES`` tensor in the binary extension: each element a 4-byte little-endian length,
    then that many bytes."""
    items, at = [], 0
    while at < len(data):
        if at + 4 > len(data):
            raise Rejected(400, "BYTES tensor ends inside an element's length")
        length = int.from_bytes(data[at : at + 4], "little")
        if at + 4 + length > len(data):
            raise Rejected(400, "BYTES tensor ends inside an element")
        items.append(data[at + 4 : at + 4 + length])
        at += 4 + length
    return items


def pack_bytes(items: list[bytes]) -> bytes:
    """:func:`unpack_bytes`' inverse."""
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


BINARY_HEADER = "Inference-Header-Content-Length"


def split_binary_request(
    body: bytes, header: str | None
) -> tuple[dict[str, Any], list[bytes | None]]:
    """The JSON of an inference request and, per input, its bytes in the binary tensor
    extension (None for an input given as JSON ``data``): the first ``header`` bytes of the body
    are the JSON, the inputs' bytes follow it in order (KServe v2 / Triton)."""
    import json

    if header is not None and not header.isdigit():
        raise Rejected(400, f"{BINARY_HEADER} must be a byte count, not {header!r}")
    head = int(header) if header is not None else len(body)
    if head > len(body):
        raise Rejected(400, f"{BINARY_HEADER} {head} is over the body's {len(body)} bytes")
    try:
        payload = json.loads(body[:head])
        inputs = payload["inputs"]
        if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise Rejected(400, 'expected {"inputs": [...]} as JSON') from None
    binary, at = [], head
    for entry in inputs:
        size = (entry.get("parameters") or {}).get("binary_data_size")
        if size is None:
            binary.append(None)
            continue
        if not isinstance(size, int) or size < 0 or at + size > len(body):
            raise Rejected(400, f"input {entry.get('name')!r}: binary_data_size {size} does not "
                                "fit the body")  # fmt: skip
        binary.append(body[at : at + size])
        at += size
    if at != len(body):
        raise Rejected(400, f"{len(body) - at} bytes after the inputs' binary data")
    return payload, binary


def encode_outputs(
    payload: dict[str, Any], outputs: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], bytes]:
    """The response's outputs as the request asked: only those it names in ``outputs`` (all
    when it names none), each in JSON ``data`` or, when asked (``parameters.binary_data`` on the
    output, or ``binary_data_output`` on the request), as binary after the JSON; returns the
    outputs' JSON and the binary tail."""
    asked = payload.get("outputs")
    every = bool((payload.get("parameters") or {}).get("binary_data_output"))
    by_name = {o["name"]: o for o in outputs}
    wanted: list[tuple[dict[str, Any], bool]] = []
    if asked:
        for request in asked:
            name = request.get("name") if isinstance(request, dict) else None
            if name not in by_name:
                raise Rejected(400, f"no output {name!r}; outputs: {', '.join(by_name)}")
            wanted.append((by_name[name], bool((request.get("parameters") or {}).get(
                "binary_data", every))))  # fmt: skip
    else:
        wanted = [(o, every) for o in outputs]
    shown, tail = [], []
    for output, binary in wanted:
        if not binary:
            shown.append(output)
            continue
        data = output["data"]
        if output["datatype"] == "BYTES":
            raw = pack_bytes([str(item).encode() for item in data])
        elif output["datatype"] == "BOOL":
            raw = np.asarray(data, dtype=np.bool_).tobytes()
        else:
            raw = np.asarray(data, dtype="<f8").tobytes()
        tail.append(raw)
        shown.append({**{k: v for k, v in output.items() if k != "data"},
                      "parameters": {"binary_data_size": len(raw)}})  # fmt: skip
    return shown, b"".join(tail)
