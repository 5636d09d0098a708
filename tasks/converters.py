"""A Keras 3 classifier in the field's formats: ONNX (through Keras's own
``model.export(format="onnx")``, which uses tf2onnx) and TFLite (``tf.lite.TFLiteConverter``;
``tflite-int8`` fully quantised as :mod:`tasks.backbones.runtime` quantises backbones), each
taking ``image`` (RGB pixels in [0, 255], preprocessing inside) and giving ``probabilities``;
and each run in its own runtime. ``wf export`` gates them (:mod:`workflows.serve.export`); ``wf
serve`` runs the ONNX one (:func:`onnx_classifier`)."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from typing import Any

import numpy as np

FORMATS = ("onnx", "tflite", "tflite-int8")
INPUT_NAME, OUTPUT_NAME, EMBEDDING_NAME = "image", "probabilities", "embedding"


def convert(model: Any, fmt: str, calibration: np.ndarray | None = None) -> bytes:
    """The Keras 3 ``model`` as ``fmt`` bytes, its input named ``image`` and its output
    ``probabilities``."""
    if fmt == "onnx":
        return to_onnx(model)
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(_named(model))
    if fmt == "tflite-int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.representative_dataset = lambda: ([image[None]] for image in calibration)  # type: ignore[union-attr]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        # It prints its signatures, and warns that the float input has no quantised statistics
        # (on purpose: int8 inside, float32 in and out).
        warnings.simplefilter("ignore", UserWarning)
        return converter.convert()


def _named(model: Any) -> Any:
    """The model with its input called ``image`` and its one output ``probabilities``."""
    import keras

    image = keras.Input(model.input_shape[1:], name=INPUT_NAME)
    out = keras.layers.Identity(name=OUTPUT_NAME)(model(image))
    return keras.Model(image, {OUTPUT_NAME: out}, name=model.name)


def to_onnx(
    model: Any, outputs: tuple[str, ...] = (OUTPUT_NAME,), opset: int | None = None
) -> bytes:
    """``model`` as ONNX through Keras's export (at ``opset``, or tf2onnx's default), its input
    renamed ``image`` and its outputs ``outputs``, in order."""
    import onnx

    model(np.zeros((1, *model.input_shape[1:]), np.float32))  # export needs a called model
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore", FutureWarning)  # tf2onnx's own np.object check
            model.export(path, format="onnx", verbose=False, opset_version=opset)
        exported = onnx.load_model(path)
    graph = exported.graph
    if len(graph.output) != len(outputs):
        raise ValueError(f"the export has {len(graph.output)} outputs, not {len(outputs)}")
    renames = {graph.input[0].name: INPUT_NAME}
    renames.update({o.name: name for o, name in zip(graph.output, outputs, strict=True)})
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    graph.input[0].name = INPUT_NAME
    for value in graph.output:
        value.name = renames[value.name]
    onnx.checker.check_model(exported)
    return exported.SerializeToString()


def run_exported(data: bytes, fmt: str, pixels: np.ndarray) -> np.ndarray:
    """The exported model's raw outputs for ``pixels``, in its own runtime."""
    if fmt == "onnx":
        from tasks.backbones.onnx_backbone import session

        runner = session(data)
        return np.concatenate([runner.run([OUTPUT_NAME], {INPUT_NAME: pixels[i : i + 32]})[0]
                               for i in range(0, len(pixels), 32)])  # fmt: skip
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data, num_threads=os.cpu_count() or 1)
    runner = interpreter.get_signature_runner()
    return np.concatenate([runner(**{INPUT_NAME: pixels[i : i + 1]})[OUTPUT_NAME]
                           for i in range(len(pixels))])  # fmt: skip
