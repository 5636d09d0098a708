"""The Keras blog's two small networks, built with either Keras 3 or tf-keras.

Training runs in tf-keras (``tf_keras``), whose ``model.fit`` works under
``tf.distribute.MultiWorkerMirroredStrategy``; Keras 3 does not fully support that strategy
(ray-project/ray#47464). The saved models are the same architectures built in Keras 3 with the
trained weights copied by layer name, so users load them with plain ``keras.saving.load_model``.
"""

from __future__ import annotations

from typing import Any

# The blog's bottleneck top: Flatten, Dense 256 relu, Dropout 0.5, one sigmoid unit.
TOP_UNITS = 256
TOP_DROPOUT = 0.5
# The blog's small convnet: three conv/relu/maxpool blocks, Dense 64, Dropout 0.5, on 150x150.
SCRATCH_FILTERS = (32, 32, 64)
SCRATCH_UNITS = 64
SCRATCH_IMAGE_SIZE = 150


def output_layer(keras_module: Any, num_classes: int, name: str) -> Any:
    """Sigmoid for two classes (the blog's), softmax for more."""
    if num_classes == 2:
        return keras_module.layers.Dense(1, activation="sigmoid", name=name)
    return keras_module.layers.Dense(num_classes, activation="softmax", name=name)


def loss_name(num_classes: int) -> str:
    return "binary_crossentropy" if num_classes == 2 else "sparse_categorical_crossentropy"


def probabilities(outputs: Any, num_classes: int) -> Any:
    """Class probabilities ``(n, num_classes)`` from a model's raw outputs."""
    import numpy as np

    outputs = np.asarray(outputs, dtype=np.float64)
    if num_classes == 2:
        positive = outputs.reshape(-1)
        return np.stack([1 - positive, positive], axis=1)
    return outputs


def build_top(
    keras_module: Any, input_shape: tuple[int, ...], num_classes: int,
    units: int = TOP_UNITS, dropout: float = TOP_DROPOUT,
) -> Any:  # fmt: skip
    layers = keras_module.layers
    inputs = keras_module.Input(input_shape, name="bottleneck")
    x = layers.Flatten(name="top_flatten")(inputs) if len(input_shape) > 1 else inputs
    x = layers.Dense(units, activation="relu", name="top_dense")(x)
    x = layers.Dropout(dropout, name="top_dropout")(x)
    return keras_module.Model(
        inputs, output_layer(keras_module, num_classes, "top_output")(x), name="top"
    )


def build_scratch(keras_module: Any, image_size: int, num_classes: int) -> Any:
    """The blog's convnet; takes RGB pixels in [0, 255] (the 1/255 rescaling is inside)."""
    layers = keras_module.layers
    inputs = keras_module.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1 / 255, name="scratch_rescale")(inputs)
    for index, filters in enumerate(SCRATCH_FILTERS):
        x = layers.Conv2D(filters, 3, activation="relu", name=f"scratch_conv{index}")(x)
        x = layers.MaxPooling2D(2, name=f"scratch_pool{index}")(x)
    x = layers.Flatten(name="scratch_flatten")(x)
    x = layers.Dense(SCRATCH_UNITS, activation="relu", name="scratch_dense")(x)
    x = layers.Dropout(0.5, name="scratch_dropout")(x)
    outputs = output_layer(keras_module, num_classes, "scratch_output")(x)
    return keras_module.Model(inputs, outputs, name="scratch")
