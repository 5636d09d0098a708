"""A user's own ONNX model as a backbone: ``--backbone onnx:PATH_OR_URI``.

The model comes with a sidecar, ``PATH_OR_URI.json`` beside it, that says what the file cannot:

- ``name``: what the store and the reports call it (the store's folder, ``--backbone NAME`` in
  ``wf train-all``, ``wf audit`` and ``wf suggest``);
- ``input_size``: ``[height, width]``; ``layout``: ``NCHW`` or ``NHWC``;
- ``scale``: pixels (RGB, 0-255) are divided by it first (255 for [0, 1]); ``mean`` and ``std``:
  per channel, after scaling (``(x / scale - mean) / std``);
- ``output``: the graph output that holds the features (default: the first);
- ``pool``: ``none`` (the output is already a vector ``[batch, dim]``), ``mean`` (a conv map's
  spatial mean, or the mean of every token of a ``[batch, tokens, dim]`` sequence), ``cls`` (the
  first token) or ``cls+mean`` (the first token beside the mean of the others, as DINOv2's
  linear probes use).

Everything the sidecar says is written into one ONNX graph, checked once on the driver
(:func:`load_onnx_backbone`): ``image`` (float32 RGB pixels in [0, 255], ``[batch, h, w, 3]``, as
every wf model takes) in, the pooled ``bottleneck`` tap out. Workers run that graph in
onnxruntime; a trained top appended to it (:func:`classifier_graph`) is the job's
``model.onnx``, which ``wf predict``, ``wf evaluate`` and ``wf serve`` load as they load
``model.keras``. A bad file is refused before any shard runs, in one line: not ONNX, weights in
an external file, over :data:`MAX_ONNX_BYTES`, an op outside the standard domains, an input
that is not one float32 image of rank 4, an output that is not there.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from storage.errors import SettingsError
from storage.filesystem import file_info, file_location, first_line, read_bytes
from storage.hashing import fingerprint, sha256_stream
from tasks.backbones.base import Backbone, ResolvedWeights

ONNX_PREFIX = "onnx:"
LAYOUTS = ("NCHW", "NHWC")
POOLS = ("none", "mean", "cls", "cls+mean")
# Protobuf's own limit for one serialised model; larger models keep their weights in external
# data files, which a model shipped to workers as one object cannot.
MAX_ONNX_BYTES = 2**31 - 1
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
IMAGE_INPUT = "image"
FEATURES_OUTPUT = "bottleneck"
PROBABILITIES_OUTPUT = "probabilities"
EMBEDDING_OUTPUT = "embedding"
USER_PREFIX = "user/"  # before every name of the user's graph
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_FLOAT = 1  # onnx.TensorProto.FLOAT
_GRAPH_VERSION = 1  # bump when the wrapping graph changes: it is in the features' fingerprint


@dataclass(frozen=True)
class Sidecar:
    """What ``PATH.json`` beside an ONNX backbone says (the module docstring has each field)."""

    name: str
    input_size: tuple[int, int]
    layout: str = "NCHW"
    scale: float = 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    output: str = ""  # "": the graph's first output
    pool: str = "none"

    @classmethod
    def parse(cls, data: bytes, where: str) -> Sidecar:
        try:
            raw = json.loads(data)
        except ValueError as error:
            raise SettingsError(f"{where} is not valid JSON: {error}") from None
        if not isinstance(raw, dict):
            raise SettingsError(f"{where} must hold a JSON object")
        unknown = sorted(set(raw) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise SettingsError(f"{where}: unknown field {', '.join(unknown)}")
        for required in ("name", "input_size"):
            if required not in raw:
                raise SettingsError(f"{where}: {required!r} is missing")
        try:
            sidecar = cls(
                name=str(raw["name"]),
                input_size=_pair(raw["input_size"]),
                layout=str(raw.get("layout", "NCHW")).upper(),
                scale=float(raw.get("scale", 255.0)),
                mean=_triple(raw.get("mean", [0.0, 0.0, 0.0]), "mean"),
                std=_triple(raw.get("std", [1.0, 1.0, 1.0]), "std"),
                output=str(raw.get("output", "")),
                pool=str(raw.get("pool", "none")),
            )
        except (TypeError, ValueError) as error:
            raise SettingsError(f"{where}: {error}") from None
        sidecar.check(where)
        return sidecar

    def check(self, where: str) -> None:
        from tasks.backbones import BACKBONES

        if not _NAME.match(self.name) or self.name.startswith("onnx"):
            raise SettingsError(
                f"{where}: name {self.name!r} must be 1-64 of a-z 0-9 _ . - and not start "
                "with 'onnx'"
            )
        if self.name in BACKBONES:
            raise SettingsError(f"{where}: name {self.name!r} is a built-in backbone's")
        if min(self.input_size) < 1:
            raise SettingsError(f"{where}: input_size must be positive: {list(self.input_size)}")
        if self.layout not in LAYOUTS:
            raise SettingsError(f"{where}: layout must be NCHW or NHWC, not {self.layout!r}")
        if self.pool not in POOLS:
            raise SettingsError(f"{where}: pool must be one of {', '.join(POOLS)}: {self.pool!r}")
        if self.scale <= 0 or min(self.std) <= 0:
            raise SettingsError(f"{where}: scale and std must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pair(value: Any) -> tuple[int, int]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueError(f"input_size must be [height, width], not {value!r}")
    return int(value[0]), int(value[1])


def _triple(value: Any, field: str) -> tuple[float, float, float]:
    if not isinstance(value, list | tuple) or len(value) != 3:
        raise ValueError(f"{field} must be 3 numbers (R, G, B), not {value!r}")
    return float(value[0]), float(value[1]), float(value[2])


def _read(uri: str) -> bytes | None:
    location, path = file_location(uri)
    if file_info(location.filesystem, path) is None:
        return None
    return read_bytes(location.filesystem, path)


class OnnxBackbone(Backbone):
    """A checked ONNX model and its sidecar, as a backbone with one tap, ``bottleneck``."""

    taps = ("bottleneck",)
    default_taps = ("bottleneck",)
    offline_imagenet = True

    def __init__(self, source: str, data: bytes, sidecar: Sidecar, graph: bytes,
                 features: int, batch_one: bool) -> None:  # fmt: skip
        self.source = source  # "onnx:PATH_OR_URI", as the user said it and the manifest holds it
        self.sidecar = sidecar
        self.name = sidecar.name
        self.default_input_size = sidecar.input_size[0]
        self.input_size = sidecar.input_size
        self.summary = f"ONNX model {source[len(ONNX_PREFIX) :]}"
        self.sha256 = sha256_stream([data])
        self.graph = graph  # the feature graph: image in, pooled bottleneck out
        self.features = features
        self.batch_one = batch_one  # the model's batch dimension is fixed at 1

    @property
    def preprocessing(self) -> str:
        """A fingerprint of everything beside the file that changes the features."""
        return fingerprint([_GRAPH_VERSION, self.sidecar.to_dict()])[:24]

    def imagenet_weights(self) -> str:
        return self.source

    def resolve_weights(self, weights: str) -> ResolvedWeights:
        if weights not in ("imagenet", self.source):
            raise SettingsError(f"{self.name} is an ONNX model: its weights are inside the file")
        return ResolvedWeights(self.source, None, self.sha256)

    def build(self, input_size: tuple[int, int], weights: ResolvedWeights,
              include_top: bool = False) -> Any:  # fmt: skip
        raise SettingsError(f"{self.name} is an ONNX model: there is no Keras model of it")

    def build_tail(self, keras_module: Any, input_shape: tuple[int, ...]) -> Any:
        raise SettingsError(f"{self.name} is an ONNX model: it has no last block to train")

    def check_input_size(self, input_size: tuple[int, int]) -> None:
        if tuple(input_size) != self.input_size:
            raise SettingsError(
                f"{self.name} takes {self.input_size[0]}x{self.input_size[1]} (its sidecar's "
                f"input_size), not {input_size[0]}x{input_size[1]}"
            )


def normalised_source(source: str) -> str:
    """``onnx:PATH`` with a local path made absolute (the manifest keeps it: a later command
    run from elsewhere finds the file); a URI as it is."""
    uri = source[len(ONNX_PREFIX) :]
    if not uri:
        raise SettingsError("--backbone onnx: needs a file: onnx:PATH_OR_URI")
    if "://" in uri:
        return source
    import os

    return ONNX_PREFIX + os.path.abspath(os.path.expanduser(uri))


def load_onnx_backbone(source: str, max_bytes: int = MAX_ONNX_BYTES) -> OnnxBackbone:
    """Read, check and wrap the ONNX model of ``source`` (``onnx:PATH_OR_URI``) and its sidecar;
    every reason it cannot be used is one :class:`SettingsError`. Loaded once per process for
    the same files (their sizes and times: a changed file is read again)."""
    source = normalised_source(source)
    uri = source[len(ONNX_PREFIX) :]
    return _load(source, max_bytes, _signature(uri), _signature(uri + ".json"))


def _signature(uri: str) -> tuple[int, int] | None:
    location, path = file_location(uri)
    info = file_info(location.filesystem, path)
    if info is None:
        return None
    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    return (int(info.size or 0), int(mtime))


@functools.lru_cache(maxsize=2)
def _load(source: str, max_bytes: int, model: Any, sidecar: Any) -> OnnxBackbone:
    import onnx

    uri = source[len(ONNX_PREFIX) :]
    if model is None:
        raise SettingsError(f"ONNX model {uri} does not exist")
    if model[0] > max_bytes:
        raise SettingsError(
            f"ONNX model {uri} is {model[0]:,} bytes, over the cap of {max_bytes:,}"
        )
    data = _read(uri)
    if data is None:
        raise SettingsError(f"ONNX model {uri} does not exist")
    sidecar_bytes = _read(uri + ".json")
    if sidecar_bytes is None:
        raise SettingsError(f"no sidecar {uri}.json beside the ONNX model (see `wf backbones`)")
    sidecar = Sidecar.parse(sidecar_bytes, f"{uri}.json")
    try:
        model = onnx.load_model_from_string(data)
    except Exception:  # protobuf's DecodeError and friends: not a model
        raise SettingsError(f"{uri} is not an ONNX model") from None
    if not len(model.graph.node):
        raise SettingsError(f"{uri} is not an ONNX model (no graph)")
    _check_model(model, uri)
    graph, features, batch_one = _feature_graph(model, sidecar, uri)
    return OnnxBackbone(source, data, sidecar, graph, features, batch_one)


def _check_model(model: Any, uri: str) -> None:
    import onnx

    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise SettingsError(f"{uri} keeps its weights in an external file: save it as one file")
    custom = sorted(
        {f"{n.domain}::{n.op_type}" for n in _all_nodes(model.graph)
         if n.domain not in STANDARD_DOMAINS}
    )  # fmt: skip
    if custom:
        raise SettingsError(f"{uri} uses custom ops, which wf cannot run: {', '.join(custom)}")
    try:
        onnx.checker.check_model(model)
    except Exception as error:
        raise SettingsError(f"{uri} is not a valid ONNX model: {first_line(error)}") from None


def _all_nodes(graph: Any) -> list[Any]:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attribute in node.attribute:
            if attribute.g.node:
                nodes.extend(_all_nodes(attribute.g))
            for sub in attribute.graphs:
                nodes.extend(_all_nodes(sub))
    return nodes


def _opset(model: Any) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def _dims(value: Any) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value.type.tensor_type.shape.dim]  # fmt: skip


def _feature_graph(model: Any, sidecar: Sidecar, uri: str) -> tuple[bytes, int, bool]:
    """The model with the sidecar's preprocessing before it and its pooling after: ``image``
    ``[batch, h, w, 3]`` float32 in [0, 255] in, ``bottleneck`` ``[batch, features]`` out.
    Returns the serialised graph, its feature count and whether its batch is fixed at 1."""
    import onnx
    from onnx import helper

    initialisers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initialisers]
    if len(inputs) != 1:
        raise SettingsError(f"{uri} has {len(inputs)} inputs; wf feeds one image tensor")
    (source_input,) = inputs
    if source_input.type.tensor_type.elem_type != _FLOAT:
        raise SettingsError(f"{uri}: input {source_input.name!r} is not float32")
    dims = _dims(source_input)
    if len(dims) != 4:
        raise SettingsError(f"{uri}: input {source_input.name!r} has rank {len(dims)}, not 4 "
                            "(batch, channels and two spatial axes)")  # fmt: skip
    spatial, channels = (dims[2:], dims[1]) if sidecar.layout == "NCHW" else (dims[1:3], dims[3])
    if isinstance(channels, int) and channels != 3:
        raise SettingsError(f"{uri}: input has {channels} channels where {sidecar.layout} puts "
                            "them, not 3 (is the sidecar's layout right?)")  # fmt: skip
    fixed = [d for d in spatial if isinstance(d, int)]
    if len(fixed) == 2 and tuple(fixed) != sidecar.input_size:
        raise SettingsError(f"{uri} takes {fixed[0]}x{fixed[1]}, the sidecar says "
                            f"{sidecar.input_size[0]}x{sidecar.input_size[1]}")  # fmt: skip
    outputs = [o.name for o in model.graph.output]
    output = sidecar.output or outputs[0]
    if output not in outputs:
        raise SettingsError(f"{uri} has no output {output!r}; its outputs: {', '.join(outputs)}")
    opset = _opset(model)
    if opset < 13:
        raise SettingsError(f"{uri} uses opset {opset}; wf needs 13 or newer")
    # Every name of the user's graph gets a prefix, so none meets wf's own (image,
    # bottleneck, probabilities, embedding, wf_*).
    from onnx import compose

    model = compose.add_prefix(model, USER_PREFIX)
    source_input = next(i for i in model.graph.input if i.name == USER_PREFIX + source_input.name)
    output = USER_PREFIX + output
    batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else "batch"
    height, width = sidecar.input_size
    graph = model.graph
    consts = [
        helper.make_tensor("wf_scale", _FLOAT, [], [sidecar.scale]),
        helper.make_tensor("wf_mean", _FLOAT, [3], list(sidecar.mean)),
        helper.make_tensor("wf_std", _FLOAT, [3], list(sidecar.std)),
    ]
    layout = "wf_scaled_nchw" if sidecar.layout == "NCHW" else source_input.name
    before = [
        helper.make_node("Div", [IMAGE_INPUT, "wf_scale"], ["wf_scaled"], name="wf_scale"),
        helper.make_node("Sub", ["wf_scaled", "wf_mean"], ["wf_centred"], name="wf_mean"),
        helper.make_node("Div", ["wf_centred", "wf_std"], [layout], name="wf_std"),
    ]
    if sidecar.layout == "NCHW":
        to_nchw = helper.make_node(
            "Transpose", [layout], [source_input.name], perm=[0, 3, 1, 2], name="wf_to_nchw"
        )
        before.append(to_nchw)
    # The output's rank decides the pooling's axes; shape inference may not know it, so ask
    # the model itself on one image.
    rank = len(_probe(model, sidecar, source_input.name, output).shape)
    after, consts_after = _pool_nodes(output, rank, sidecar, uri, opset)
    new_nodes = [*before, *graph.node, *after]
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend([*consts, *consts_after])
    del graph.input[:]
    graph.input.append(
        helper.make_tensor_value_info(IMAGE_INPUT, _FLOAT, [batch, height, width, 3])
    )
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(FEATURES_OUTPUT, _FLOAT, [batch, None]))
    data = model.SerializeToString()
    try:
        onnx.checker.check_model(model)
        runner = session(data, threads=1)
        probe = runner.run([FEATURES_OUTPUT], {IMAGE_INPUT: np.zeros((1, height, width, 3),
                                                                   np.float32)})[0]  # fmt: skip
    except Exception as error:
        raise SettingsError(
            f"{uri}: wf's graph around the model does not run: {first_line(error)}"
        ) from None
    if probe.ndim != 2:
        raise SettingsError(f"{uri}: the pooled output has shape {list(probe.shape)}, not "
                            "[batch, features]")  # fmt: skip
    batch_one = batch == 1
    if not batch_one:  # a batch it declares but cannot run (a reshape fixed at 1 inside)
        try:
            two = runner.run([FEATURES_OUTPUT], {IMAGE_INPUT: np.zeros((2, height, width, 3),
                                                                     np.float32)})[0]  # fmt: skip
            batch_one = two.shape[0] != 2
        except Exception:
            batch_one = True
        if batch_one:  # say so in the graph: its users run it one image at a time
            _fix_batch(model, 1)
            data = model.SerializeToString()
    return data, int(probe.shape[1]), batch_one


def _fix_batch(model: Any, size: int) -> None:
    """The graph's input and outputs declared with a batch of ``size``."""
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].ClearField("dim_param")
            dims[0].dim_value = size


def _probe(model: Any, sidecar: Sidecar, name: str, output: str) -> np.ndarray:
    """The original model's feature output on one blank image, or one line saying why not."""
    height, width = sidecar.input_size
    shape = (1, 3, height, width) if sidecar.layout == "NCHW" else (1, height, width, 3)
    try:
        runner = session(model.SerializeToString(), threads=1)
        return runner.run([output], {name: np.zeros(shape, np.float32)})[0]
    except Exception as error:
        raise SettingsError(f"onnxruntime cannot run the model: {first_line(error)}") from None


def _mean(source: str, target: str, axes: list[int], opset: int, name: str) -> tuple[list, list]:
    """ReduceMean over ``axes``: an input from opset 18, an attribute before."""
    from onnx import helper

    if opset < 18:
        return [helper.make_node("ReduceMean", [source], [target], axes=axes, keepdims=0,
                                 name=name)], []  # fmt: skip
    constant = helper.make_tensor(f"{name}_axes", 7, [len(axes)], axes)  # INT64
    return [helper.make_node("ReduceMean", [source, f"{name}_axes"], [target], keepdims=0,
                             name=name)], [constant]  # fmt: skip


def _pool_nodes(
    output: str, rank: int, sidecar: Sidecar, uri: str, opset: int
) -> tuple[list, list]:
    """The nodes from the model's ``output`` of ``rank`` to ``bottleneck``, by the sidecar's
    pool, and the constants they need."""
    from onnx import helper

    pool = sidecar.pool
    shown = output.removeprefix(USER_PREFIX)  # the user's own name, in messages
    axes = helper.make_tensor("wf_token_axis", 7, [1], [1])  # INT64
    if pool == "none":
        if rank != 2:
            raise SettingsError(
                f"{uri}: output {shown!r} has rank {rank}; pool 'none' needs a vector "
                "[batch, features] (choose mean, cls or cls+mean)"
            )
        return [helper.make_node("Identity", [output], [FEATURES_OUTPUT], name="wf_pool")], []
    if pool == "mean" and rank == 4:
        spatial = [2, 3] if sidecar.layout == "NCHW" else [1, 2]
        return _mean(output, FEATURES_OUTPUT, spatial, opset, "wf_pool")
    if rank != 3:
        raise SettingsError(f"{uri}: pool {pool!r} needs a token sequence [batch, tokens, dim] "
                            f"{'or a conv map ' if pool == 'mean' else ''}; output {shown!r} "
                            f"has rank {rank}")  # fmt: skip
    if pool == "mean":
        return _mean(output, FEATURES_OUTPUT, [1], opset, "wf_pool")
    first = helper.make_tensor("wf_first", 7, [], [0])
    target = FEATURES_OUTPUT if pool == "cls" else "wf_cls"
    cls = helper.make_node("Gather", [output, "wf_first"], [target], axis=1, name="wf_cls")
    if pool == "cls":
        return [cls], [first]
    starts = helper.make_tensor("wf_rest_start", 7, [1], [1])
    ends = helper.make_tensor("wf_rest_end", 7, [1], [2**62])
    mean_nodes, mean_consts = _mean("wf_rest", "wf_rest_mean", [1], opset, "wf_mean_tokens")
    return [
        cls,
        helper.make_node("Slice", [output, "wf_rest_start", "wf_rest_end", "wf_token_axis"],
                         ["wf_rest"], name="wf_rest"),
        *mean_nodes,
        helper.make_node("Concat", ["wf_cls", "wf_rest_mean"], [FEATURES_OUTPUT], axis=1,
                         name="wf_pool"),
    ], [first, starts, ends, axes, *mean_consts]  # fmt: skip


def session(data: bytes, threads: int = 0) -> Any:
    """An onnxruntime session of ``data`` on the CPU with ``threads`` intra-op threads (0: as
    many as the machine has), one graph at a time."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run_in_batches(runner: Any, x: np.ndarray, outputs: list[str], batch_one: bool) -> list:
    """``outputs`` of a session for images ``x`` (float32 NHWC), one image at a time where the
    model's batch is fixed at 1."""
    if not batch_one or len(x) <= 1:
        return runner.run(outputs, {IMAGE_INPUT: x})
    each = [runner.run(outputs, {IMAGE_INPUT: x[i : i + 1]}) for i in range(len(x))]
    return [np.concatenate([e[k] for e in each]) for k in range(len(outputs))]


def classifier_graph(backbone_graph: bytes, top: Any, embedding_layer: str) -> bytes:
    """One ONNX graph of the feature graph and a trained Keras top on its ``bottleneck``
    output: ``image`` in, ``probabilities`` (the top's output, as ``model.keras`` gives it: one
    sigmoid unit for two classes, else a softmax) and ``embedding`` (the input of the top's
    ``embedding_layer``, what abstention measures distance on) out. The top's layers are written
    one by one; a layer of another kind is a :class:`SettingsError`."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_model_from_string(backbone_graph)
    graph = model.graph
    current, embedding = FEATURES_OUTPUT, ""
    for layer in top.layers:
        kind, name = type(layer).__name__, f"wf_top_{layer.name}"
        if kind == "InputLayer":
            continue
        if layer.name == embedding_layer:
            embedding = current
        if kind == "Dropout":
            continue
        if kind == "Flatten":
            graph.node.append(helper.make_node("Flatten", [current], [name], axis=1, name=name))
        elif kind == "UnitNormalization":
            eps = helper.make_tensor(f"{name}_eps", _FLOAT, [], [1e-12])
            axis = helper.make_tensor(f"{name}_axis", 7, [1], [-1])
            graph.initializer.extend([eps, axis])
            graph.node.extend([
                helper.make_node("Mul", [current, current], [f"{name}_sq"], name=f"{name}_sq"),
                helper.make_node("ReduceSum", [f"{name}_sq", f"{name}_axis"], [f"{name}_sum"],
                                 keepdims=1, name=f"{name}_sum"),
                helper.make_node("Max", [f"{name}_sum", f"{name}_eps"], [f"{name}_safe"],
                                 name=f"{name}_safe"),
                helper.make_node("Sqrt", [f"{name}_safe"], [f"{name}_norm"], name=f"{name}_norm"),
                helper.make_node("Div", [current, f"{name}_norm"], [name], name=name),
            ])  # fmt: skip
        elif kind == "Dense":
            kernel, bias = (np.asarray(w, np.float32) for w in layer.get_weights())
            graph.initializer.extend([numpy_helper.from_array(kernel, f"{name}_kernel"),
                                      numpy_helper.from_array(bias, f"{name}_bias")])  # fmt: skip
            activation = layer.get_config()["activation"]
            ops = {"relu": "Relu", "sigmoid": "Sigmoid", "softmax": "Softmax", "linear": ""}
            if activation not in ops:
                raise SettingsError(
                    f"cannot write activation {activation!r} of {layer.name} in ONNX"
                )
            linear = f"{name}_linear" if ops[activation] else name
            graph.node.append(helper.make_node("Gemm", [current, f"{name}_kernel", f"{name}_bias"],
                                               [linear], name=f"{name}_gemm"))  # fmt: skip
            if ops[activation] == "Softmax":
                graph.node.append(helper.make_node("Softmax", [linear], [name], axis=-1, name=name))
            elif ops[activation]:
                graph.node.append(helper.make_node(ops[activation], [linear], [name], name=name))
        else:
            raise SettingsError(f"cannot write a {kind} layer ({layer.name}) in ONNX")
        current = name
    del graph.output[:]
    graph.node.append(helper.make_node("Identity", [current], [PROBABILITIES_OUTPUT],
                                       name="wf_probabilities"))  # fmt: skip
    graph.node.append(helper.make_node("Identity", [embedding or FEATURES_OUTPUT],
                                       [EMBEDDING_OUTPUT], name="wf_embedding"))  # fmt: skip
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_value if batch.HasField("dim_value") else "batch"
    graph.output.extend([
        helper.make_tensor_value_info(PROBABILITIES_OUTPUT, _FLOAT, [batch_dim, None]),
        helper.make_tensor_value_info(EMBEDDING_OUTPUT, _FLOAT, [batch_dim, None]),
    ])  # fmt: skip
    onnx.checker.check_model(model)
    return model.SerializeToString()


def fusion_graph(
    builtin: bytes | None, parts: dict[int, bytes], order: list[str], side: int = 0
) -> bytes:
    """One feature graph for the fusion method over built-in and ONNX backbones: ``builtin``
    is the Keras part exported to ONNX, taking ``image`` and giving, in ``order``, each built-in
    backbone's flattened features and, for each ONNX backbone ``i``, the image resized to its
    input (``wf_image_{i}``, or ``image`` itself at the model's size); ``parts[i]`` is that
    backbone's feature graph. Returns the graph with every part's features side by side as
    ``bottleneck``."""
    import onnx
    from onnx import compose, helper, version_converter

    loaded = {index: onnx.load_model_from_string(data) for index, data in parts.items()}
    opset = max(_opset(part) for part in loaded.values())
    if builtin is None:  # only ONNX backbones: a graph of the image alone to start from
        image = helper.make_tensor_value_info(IMAGE_INPUT, _FLOAT, ["batch", side, side, 3])
        model = helper.make_model(helper.make_graph([], "wf_fusion", [image], []),
                                  opset_imports=[helper.make_opsetid("", opset)])  # fmt: skip
    else:
        model = onnx.load_model_from_string(builtin)
        if _opset(model) < opset:
            model = version_converter.convert_version(model, opset)
        opset = max(opset, _opset(model))
    model.ir_version = max(model.ir_version, *(part.ir_version for part in loaded.values()))
    graph = model.graph
    features = list(order)
    batch_one = any(_dims(part.graph.input[0])[0] == 1 for part in loaded.values())
    for index, part in loaded.items():
        if _opset(part) != opset:
            part = version_converter.convert_version(part, opset)
        part = compose.add_prefix(part, f"wf_part{index}_")
        source = order[index]  # wf_image_{index}, or the image itself
        graph.node.append(helper.make_node("Identity", [source], [f"wf_part{index}_{IMAGE_INPUT}"],
                                           name=f"wf_feed{index}"))  # fmt: skip
        graph.node.extend(part.graph.node)
        graph.initializer.extend(part.graph.initializer)
        known = {o.domain for o in model.opset_import}
        model.opset_import.extend(o for o in part.opset_import if o.domain not in known)
        features[index] = f"wf_part{index}_{FEATURES_OUTPUT}"
    graph.node.append(helper.make_node("Concat", features, [FEATURES_OUTPUT], axis=1,
                                       name="wf_fuse"))  # fmt: skip
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(FEATURES_OUTPUT, _FLOAT, ["batch", None]))
    if batch_one:  # a part runs one image at a time: so does the whole
        _fix_batch(model, 1)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def graph_opset(data: bytes) -> int:
    import onnx

    return _opset(onnx.load_model_from_string(data))


class OnnxModel:
    """A saved ``model.onnx`` (:func:`classifier_graph`) with the two calls wf's classifier
    makes of a Keras model: ``input_shape`` and ``predict_on_batch``."""

    artifact = "model.onnx"

    def __init__(self, data: bytes, threads: int = 0, outputs: tuple[str, ...] = ()) -> None:
        self.data = data
        self.session = session(data, threads)
        (image,) = self.session.get_inputs()
        if image.name != IMAGE_INPUT:
            raise SettingsError(
                f"an ONNX classifier takes {IMAGE_INPUT!r}, this one {image.name!r}"
            )
        self.input_shape = (None, *image.shape[1:])
        self.batch_one = image.shape[0] == 1
        self.outputs = outputs or (PROBABILITIES_OUTPUT,)

    def predict_on_batch(self, pixels: np.ndarray) -> Any:
        found = run_in_batches(self.session, np.asarray(pixels, np.float32), list(self.outputs),
                               self.batch_one)  # fmt: skip
        return found[0] if len(found) == 1 else tuple(found)

    def with_embedding(self) -> OnnxModel:
        """The same model answering ``(probabilities, embedding)``, sharing its session."""
        both = object.__new__(OnnxModel)
        both.__dict__.update(self.__dict__, outputs=(PROBABILITIES_OUTPUT, EMBEDDING_OUTPUT))
        return both

    def save(self, path: str) -> None:
        with open(path, "wb") as handle:
            handle.write(self.data)
