"""Running a frozen backbone fast: prepared once on the driver, built once per worker process.

The driver builds the Keras model with its weights and converts it for the chosen runtime:

- ``litert`` (default): the TFLite flatbuffer from ``tf.lite.TFLiteConverter``, run by the
  LiteRT interpreter with XNNPACK; on a 2-core CPU about 2x ``model.predict`` with outputs
  equal to Keras's to 1e-4 of the tap's scale (``tests/tasks/test_backbones.py``). Workers then
  need neither TensorFlow nor Keras, which also makes them start faster and smaller.
- ``litert-int8``: the same graph fully quantised to int8 (weights and activations, float in
  and out), calibrated on images of the dataset's own training split: on CPUs with fast int8
  kernels about 2x float32, features at a cosine similarity of about 0.99 to float32's (the
  accuracy it costs is measured in the training benchmark).
- ``keras``: the ``.keras`` archive, run with ``model.predict_on_batch``.
- ``onnxruntime``: a user's ONNX model (``--backbone onnx:PATH``) with its sidecar's
  preprocessing and pooling written into the graph (:mod:`tasks.backbones.onnx_backbone`), run
  by onnxruntime on the CPU with the task's threads. The only runtime of an ONNX backbone.

The bytes are cached under ``<cache>/backbones/`` by a key of everything that changes outputs,
and shipped to workers through Ray's object store, so remote nodes need no shared disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from storage.errors import SettingsError
from storage.filesystem import write_bytes
from storage.hashing import fingerprint
from tasks.backbones import Backbone, ResolvedWeights, feature_model
from tasks.backbones.onnx_backbone import (
    FEATURES_OUTPUT,
    OnnxBackbone,
    run_in_batches,
    session,
)

RUNTIMES = ("litert", "litert-int8", "keras", "onnxruntime")
ONNX_RUNTIME = "onnxruntime"
DEFAULT_RUNTIME = "litert"
_CONVERSION_VERSION = 1


@dataclass(frozen=True)
class PreparedBackbone:
    """Everything a worker needs to compute taps, and what a manifest records of it."""

    key: str
    backbone: str
    input_size: tuple[int, int]
    taps: dict[str, tuple[int, ...]]
    runtime: str
    weights: ResolvedWeights
    model_bytes: bytes
    calibration: str = ""  # the calibration images' fingerprint (int8 only)
    preprocessing: str = ""  # an ONNX backbone's sidecar fingerprint (its features depend on it)
    batch_one: bool = False  # an ONNX backbone whose batch is fixed at 1


def runtime_for(backbone: Backbone, runtime: str) -> str:
    """The runtime ``backbone`` runs in when ``runtime`` was asked for: an ONNX model always in
    onnxruntime (the default ``litert`` means it too), a built-in one never."""
    if isinstance(backbone, OnnxBackbone):
        if runtime not in (DEFAULT_RUNTIME, ONNX_RUNTIME):
            raise SettingsError(f"{backbone.name} is an ONNX model: it runs in onnxruntime, "
                                f"not {runtime}")  # fmt: skip
        return ONNX_RUNTIME
    if runtime == ONNX_RUNTIME:
        raise SettingsError("--runtime onnxruntime runs ONNX models: --backbone onnx:PATH")
    return runtime


def calibration_fingerprint(images: np.ndarray) -> str:
    return fingerprint([list(images.shape), hashlib.sha256(images.tobytes()).hexdigest()])[:24]


def prepare_backbone(
    backbone: Backbone,
    weights: ResolvedWeights,
    input_size: tuple[int, int],
    taps: tuple[str, ...],
    runtime: str,
    cache_dir: str,
    calibration: np.ndarray | None = None,
) -> PreparedBackbone:
    """Build and convert the backbone for ``runtime`` (or load it from the cache, by a key of
    everything that changes its outputs). ``litert-int8`` needs ``calibration``: ``uint8``
    images ``(n, height, width, 3)`` of the model's input size."""
    if runtime not in RUNTIMES:
        raise SettingsError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    runtime = runtime_for(backbone, runtime)
    unknown = [tap for tap in taps if tap not in backbone.taps]
    if unknown:
        raise SettingsError(
            f"{backbone.name} has no tap {', '.join(unknown)}; its taps: {', '.join(backbone.taps)}"
        )
    if isinstance(backbone, OnnxBackbone):
        backbone.check_input_size(input_size)
        key = fingerprint([_CONVERSION_VERSION, backbone.name, weights.sha256,
                           backbone.preprocessing])[:24]  # fmt: skip
        taps_shape = {"bottleneck": (backbone.features,)}
        return PreparedBackbone(key, backbone.name, input_size, taps_shape, runtime, weights,
                                backbone.graph, "", backbone.preprocessing,
                                backbone.batch_one)  # fmt: skip
    calibrated = ""
    if runtime == "litert-int8":
        if calibration is None or not len(calibration):
            raise SettingsError("the litert-int8 runtime needs calibration images")
        calibrated = calibration_fingerprint(calibration)
    key = fingerprint([_CONVERSION_VERSION, backbone.name, list(input_size), weights.sha256,
                       list(taps), runtime, calibrated])[:24]  # fmt: skip
    folder = os.path.join(cache_dir, "backbones")
    model_path = os.path.join(folder, f"{backbone.name}-{key}.{_suffix(runtime)}")
    shapes_path = model_path + ".json"
    if os.path.exists(model_path) and os.path.exists(shapes_path):
        with open(shapes_path) as handle:
            shapes = {tap: tuple(shape) for tap, shape in json.load(handle).items()}
        with open(model_path, "rb") as handle:
            data = handle.read()
    else:
        model = feature_model(backbone.build(input_size, weights), taps)
        shapes = {tap: tuple(int(d) for d in model.output[tap].shape[1:]) for tap in taps}
        data = _convert(model, runtime, calibration)
        local = pafs.LocalFileSystem()
        write_bytes(local, model_path, data)
        write_bytes(local, shapes_path, json.dumps(shapes).encode())
    return PreparedBackbone(
        key, backbone.name, input_size, shapes, runtime, weights, data, calibrated
    )


def _suffix(runtime: str) -> str:
    return "keras" if runtime == "keras" else "tflite"


def _convert(model: Any, runtime: str, calibration: np.ndarray | None) -> bytes:
    if runtime.startswith("litert"):
        import contextlib
        import io

        import tensorflow as tf

        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        if runtime == "litert-int8":
            # Full integer quantisation: int8 weights and activations, the ranges calibrated on
            # the images given; float32 stays at the input and outputs (quantise/dequantise).
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.representative_dataset = lambda: (
                [image[None].astype(np.float32)]
                for image in calibration  # type: ignore[union-attr]
            )
        with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its signatures
            return converter.convert()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "backbone.keras")
        model.save(path)
        with open(path, "rb") as handle:
            return handle.read()


class FeatureExtractor:
    """Computes the taps of a batch of ``uint8`` images; build one per process and reuse it."""

    def __init__(self, prepared: PreparedBackbone, threads: int = 1) -> None:
        self.prepared = prepared
        if prepared.runtime == ONNX_RUNTIME:
            self._session = session(prepared.model_bytes, threads)
        elif prepared.runtime != "keras":
            from ai_edge_litert.interpreter import Interpreter

            self._interpreter = Interpreter(model_content=prepared.model_bytes, num_threads=threads)
            self._runner = self._interpreter.get_signature_runner()
            signature = self._interpreter.get_signature_list()["serving_default"]
            (self._input_name,) = signature["inputs"]
        else:
            import keras

            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, "backbone.keras")
                with open(path, "wb") as handle:
                    handle.write(prepared.model_bytes)
                self._model = keras.saving.load_model(path, compile=False)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """``images``: ``(n, h, w, 3)`` uint8. Returns each tap as ``(n, *shape)`` float32."""
        pixels = images.astype(np.float32)
        if self.prepared.runtime == ONNX_RUNTIME:
            (out,) = run_in_batches(self._session, pixels, [FEATURES_OUTPUT],
                                    self.prepared.batch_one)  # fmt: skip
            return {"bottleneck": np.asarray(out, np.float32)}
        if self.prepared.runtime == "keras":
            out = self._model.predict_on_batch(pixels)
            return {tap: np.asarray(out[tap], np.float32) for tap in self.prepared.taps}
        # XNNPACK is fastest one image at a time here (measured: 141 img/s at batch 1, 60 at
        # batch 32 on 2 cores), and a fixed shape avoids re-planning the graph.
        outputs = [
            self._runner(**{self._input_name: pixels[i : i + 1]}) for i in range(len(pixels))
        ]
        return {
            tap: np.concatenate([out[tap] for out in outputs]).astype(np.float32, copy=False)
            for tap in self.prepared.taps
        }


_EXTRACTORS: dict[tuple[str, int], FeatureExtractor] = {}


def extractor_for(prepared: PreparedBackbone, threads: int = 1) -> FeatureExtractor:
    """The process's extractor for ``prepared``, built on first use and then reused."""
    cache_key = (prepared.key, threads)
    if cache_key not in _EXTRACTORS:
        _EXTRACTORS.clear()  # one backbone per worker at a time keeps memory flat
        _EXTRACTORS[cache_key] = FeatureExtractor(prepared, threads)
    return _EXTRACTORS[cache_key]
