"""Moving weights and optimiser state between models by layer name.

Training runs in tf-keras and the saved model is built in Keras 3; the fine-tuned block lives
in a small tail model and in the whole base; checkpoints hold weights as ``{layer: [arrays]}``.
Layer names are the contract that ties them together.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def named_weights(model: Any) -> dict[str, list[np.ndarray]]:
    """Every weighted layer's weights by name, nested models flattened."""
    out: dict[str, list[np.ndarray]] = {}
    for layer in model.layers:
        if hasattr(layer, "layers"):
            out.update(named_weights(layer))
        elif layer.weights:
            out[layer.name] = [np.asarray(w) for w in layer.get_weights()]
    return out


def set_named_weights(model: Any, weights: dict[str, list[np.ndarray]]) -> int:
    """Give each layer of ``model`` named in ``weights`` those weights; returns how many."""
    copied = 0
    for layer in model.layers:
        if hasattr(layer, "layers"):
            copied += set_named_weights(layer, weights)
        elif layer.weights and layer.name in weights:
            layer.set_weights(weights[layer.name])
            copied += 1
    return copied


def optimizer_state(optimizer: Any) -> list[Any]:
    """The optimiser's variables (step count, then momentum or moving averages), in order."""
    variables = optimizer.variables
    return list(variables() if callable(variables) else variables)


def restore_optimizer_state(model: Any, values: list[np.ndarray]) -> None:
    """Build ``model``'s optimiser and give it ``values`` (saved from :func:`optimizer_state`);
    call inside the strategy's scope."""
    model.optimizer.build(model.trainable_variables)
    variables = optimizer_state(model.optimizer)
    shapes = [tuple(v.shape) for v in variables]
    if shapes != [tuple(v.shape) for v in values]:
        raise ValueError(f"checkpointed optimiser state does not fit this model: {shapes}")
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)


def weights_digest(weights: dict[str, list[np.ndarray]]) -> str:
    """One hash of every weight, to tell whether workers ended in sync."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        for array in weights[name]:
            digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()
