"""Small real ONNX models made with the ``onnx`` package, for the ONNX backbone's tests: a
convolution (NCHW or NHWC in, a conv map out) and a patch-token model (``[batch, tokens, dim]``
out, like a ViT's), with seeded weights, and broken files of each kind wf must refuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(model: onnx.ModelProto, path: Path, sidecar: dict | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    if sidecar is not None:
        Path(f"{path}.json").write_text(json.dumps(sidecar))
    return path


def _model(nodes, inputs, outputs, initialisers, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initialisers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def conv_model(
    path: Path, size: int = 32, layout: str = "NCHW", name: str = "tinyconv", opset: int = 17,
    batch: int | str = "N", sidecar: dict | None = None,
) -> Path:  # fmt: skip
    """Conv 3->8, 3x3, stride 2, then ReLU: the output ``features`` is a conv map."""
    rng = np.random.default_rng(0)
    kernel = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    nodes, source = [], "pixels"
    shape = [batch, 3, size, size] if layout == "NCHW" else [batch, size, size, 3]
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["pixels"], ["nchw"], perm=[0, 3, 1, 2]))
        source = "nchw"
    nodes += [
        helper.make_node("Conv", [source, "kernel"], ["conv"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["features_nchw"]),
    ]
    if layout == "NHWC":
        nodes.append(
            helper.make_node("Transpose", ["features_nchw"], ["features"], perm=[0, 2, 3, 1])
        )
    else:
        nodes.append(helper.make_node("Identity", ["features_nchw"], ["features"]))
    model = _model(
        nodes,
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", None, None, None])],
        [numpy_helper.from_array(kernel, "kernel")],
        opset,
    )
    default = {"name": name, "input_size": [size, size], "layout": layout, "scale": 255,
               "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "pool": "mean"}  # fmt: skip
    return _save(model, path, default if sidecar is None else sidecar)


def token_model(path: Path, size: int = 32, patch: int = 8, name: str = "tinyvit",
                pool: str = "cls+mean") -> Path:  # fmt: skip
    """Patch embedding (conv ``patch`` x ``patch``, stride ``patch``, 3->16) as a token sequence
    ``[batch, tokens, 16]`` behind a first token that is the tokens' max: ``tokens``."""
    rng = np.random.default_rng(1)
    kernel = rng.normal(0, 0.2, (16, 3, patch, patch)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["pixels", "kernel"], ["patches"], strides=[patch, patch]),
        helper.make_node("Reshape", ["patches", "flat_shape"], ["flat"]),  # [N, 16, T]
        helper.make_node("Transpose", ["flat"], ["seq"], perm=[0, 2, 1]),  # [N, T, 16]
        helper.make_node("ReduceMax", ["seq"], ["first"], axes=[1], keepdims=1),
        helper.make_node("Concat", ["first", "seq"], ["tokens"], axis=1),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 3, size, size])],
        [
            helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", None, None]),
            helper.make_tensor_value_info("patches", TensorProto.FLOAT, ["N", None, None, None]),
        ],
        [
            numpy_helper.from_array(kernel, "kernel"),
            numpy_helper.from_array(np.array([0, 16, -1], np.int64), "flat_shape"),
        ],
        opset=17,
    )
    sidecar = {"name": name, "input_size": [size, size], "layout": "NCHW", "scale": 255,
               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "output": "tokens",
               "pool": pool}  # fmt: skip
    return _save(model, path, sidecar)


def custom_op_model(path: Path, size: int = 32) -> Path:
    """A graph with an op of a custom domain, which no standard runtime knows."""
    model = _model(
        [helper.make_node("Mystery", ["pixels"], ["features"], domain="com.example")],
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", None, None, None])],
        [],
    )
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return _save(model, path, {"name": "custom", "input_size": [size, size], "pool": "mean"})


def rank3_input_model(path: Path) -> Path:
    """A model whose input is ``[batch, 3, 32]``: no image."""
    model = _model(
        [helper.make_node("Relu", ["pixels"], ["features"])],
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 3, 32])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", None, None])],
        [],
    )
    return _save(model, path, {"name": "flat", "input_size": [32, 32], "pool": "mean"})


def clashing_model(path: Path, size: int = 32) -> Path:
    """A model that uses wf's own names: input ``image``, output ``bottleneck``, a tensor
    ``probabilities`` inside, and a reshape that fixes the batch at 1 though the input says
    ``N`` (the features: ``[1, 12]``)."""
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["probabilities"], axes=[2, 3], keepdims=0),
        helper.make_node("Concat", ["probabilities"] * 4, ["wide"], axis=1),
        helper.make_node("Reshape", ["wide", "one"], ["bottleneck"]),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("bottleneck", TensorProto.FLOAT, ["N", 12])],
        [numpy_helper.from_array(np.array([1, 12], np.int64), "one")],
    )
    return _save(model, path, {"name": "clash", "input_size": [size, size], "scale": 1})
