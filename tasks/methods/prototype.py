"""A few-shot method for the smallest datasets: nearest class mean of the stored embeddings.

Each class is the mean of its training images' L2-normalised ``bottleneck`` embeddings (its
prototype, normalised again); an image's logit for a class is ``scale`` times the cosine
between its embedding and that prototype, so the model is the unit-normalised embedding into
one Dense layer whose kernel holds the scaled prototypes (for two classes, one sigmoid unit on
the difference, as the blog's tops). Nothing is learnt by gradient: no epochs. The scale (a
temperature) is fitted on held-out rows: each training image scored against the prototypes
computed without it (leave one out), the scale that minimises their log loss on a grid. With
``--cv`` the run's out-of-fold temperature then calibrates the saved model as for every method.
Saved as the base with this head on it, a complete ``.keras`` model like every method's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks.heads import output_layer
from tasks.methods.base import Recipe
from tasks.methods.bottleneck import Bottleneck

SCALES = np.geomspace(1.0, 200.0, 80)  # the cosine scales tried (1/temperature)


def _unit(x: np.ndarray) -> np.ndarray:
    flat = x.reshape(len(x), -1).astype(np.float64)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


def _log_loss(cosines: np.ndarray, y: np.ndarray, scale: float) -> float:
    logits = scale * cosines
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def fit_prototypes(x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, float]:
    """The unit prototypes ``(classes, dim)`` of rows ``x`` with labels ``y`` and the scale
    fitted by leave-one-out log loss (rows of a class of one image are scored against the
    prototypes with theirs left as is)."""
    unit, y = _unit(x), np.asarray(y, np.int64)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise ValueError(f"a class has no training rows (counts {counts.astype(int).tolist()})")
    sums = np.zeros((num_classes, unit.shape[1]))
    np.add.at(sums, y, unit)
    prototypes = _unit(sums)
    cosines = unit @ prototypes.T
    own = sums[y] - unit  # each row's class without it
    alone = counts[y] <= 1
    own[alone] = sums[y][alone]
    cosines[np.arange(len(y)), y] = np.sum(unit * _unit(own), axis=1)
    scale = min(SCALES, key=lambda s: _log_loss(cosines, y, s))
    return prototypes, float(scale)


def head_weights(prototypes: np.ndarray, scale: float) -> list[np.ndarray]:
    """The output layer's kernel and bias: softmax over ``scale`` x cosine, or for two classes
    one sigmoid unit on the difference of the two cosines (the same probabilities)."""
    if len(prototypes) == 2:
        kernel = (scale * (prototypes[1] - prototypes[0]))[:, None]
    else:
        kernel = scale * prototypes.T
    return [kernel.astype(np.float32), np.zeros(kernel.shape[1], np.float32)]


def predict_prototypes(weights: dict[str, list[np.ndarray]], x: np.ndarray) -> np.ndarray:
    """The head's raw outputs (as the Keras model gives them) for rows ``x``, in numpy."""
    kernel, bias = weights["top_output"]
    logits = _unit(x) @ kernel + bias
    if kernel.shape[1] == 1:
        return 1.0 / (1.0 + np.exp(-logits))
    logits -= logits.max(axis=1, keepdims=True)
    found = np.exp(logits)
    return found / found.sum(axis=1, keepdims=True)


def build_head(keras_module: Any, input_shape: tuple[int, ...], num_classes: int) -> Any:
    layers = keras_module.layers
    inputs = keras_module.Input(input_shape, name="bottleneck")
    x = layers.Flatten(name="top_flatten")(inputs) if len(input_shape) > 1 else inputs
    x = layers.UnitNormalization(name="top_unit")(x)
    return keras_module.Model(
        inputs, output_layer(keras_module, num_classes, "top_output")(x), name="top"
    )


class Prototype(Bottleneck):
    """The bottleneck method's rows, model and saved model, with this head set in closed form."""

    name = "prototype"
    embedding_layer = "top_output"  # its input: the unit embedding
    summary = "nearest class mean of the stored embeddings, cosine (few-shot; no epochs)"
    recipe = Recipe(epochs=1)  # nothing is trained by gradient: the closed form sets the head
    closed_form = True

    def build_on_rows(
        self, keras_module: Any, feature_shape: tuple[int, ...], num_classes: int
    ) -> Any:
        return build_head(keras_module, feature_shape, num_classes)

    def fit_closed_form(
        self, x: np.ndarray, y: np.ndarray, num_classes: int
    ) -> dict[str, list[np.ndarray]]:
        prototypes, scale = fit_prototypes(x, y, num_classes)
        return {"top_output": head_weights(prototypes, scale)}

    def predict_closed_form(
        self, weights: dict[str, list[np.ndarray]], x: np.ndarray
    ) -> np.ndarray:
        return predict_prototypes(weights, x)
