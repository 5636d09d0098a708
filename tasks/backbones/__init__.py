"""The backbone registry: every pretrained base wf can extract with, by name.

Each backbone is an object (:class:`tasks.backbones.base.Backbone`) that knows its input size,
taps, preprocessing and weights; an unknown name is an error, never a silent default. A user's
own ONNX model is ``onnx:PATH_OR_URI`` (:mod:`tasks.backbones.onnx_backbone`); its stores are
named by its sidecar's ``name`` and record the ``onnx:`` source as their weights.
"""

from __future__ import annotations

from typing import Any

from storage.errors import SettingsError
from tasks.backbones.base import TAP_DESCRIPTIONS, Backbone, ResolvedWeights
from tasks.backbones.efficientnet_lite import LITE_BACKBONES
from tasks.backbones.onnx_backbone import ONNX_PREFIX, load_onnx_backbone
from tasks.backbones.vgg16 import VGG16Backbone

BACKBONES: dict[str, Backbone] = {b.name: b for b in (*LITE_BACKBONES, VGG16Backbone())}
DEFAULT_BACKBONE = "efficientnet_lite0"

__all__ = [
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "TAP_DESCRIPTIONS",
    "Backbone",
    "ResolvedWeights",
    "feature_model",
    "get_backbone",
    "is_onnx_store",
    "store_backbone",
]


def get_backbone(name: str) -> Backbone:
    """A built-in backbone by name, or a user's ONNX model by ``onnx:PATH_OR_URI``."""
    if name.startswith(ONNX_PREFIX):
        return load_onnx_backbone(name)
    try:
        return BACKBONES[name]
    except KeyError:
        raise SettingsError(
            f"unknown backbone {name!r}; choose one of {', '.join(sorted(BACKBONES))} "
            "or onnx:PATH_OR_URI"
        ) from None


def store_backbone(name: str, weights_source: str) -> Backbone:
    """The backbone a store was extracted with: its manifest's ``backbone`` and
    ``weights_source`` (an ONNX model's store names its sidecar's name and its ``onnx:``
    source)."""
    if not weights_source.startswith(ONNX_PREFIX):
        return get_backbone(name)
    backbone = load_onnx_backbone(weights_source)
    if backbone.name != name:
        raise SettingsError(
            f"{weights_source}'s sidecar names it {backbone.name!r}, its store {name!r}"
        )
    return backbone


def is_onnx_store(weights_source: str) -> bool:
    return weights_source.startswith(ONNX_PREFIX)


def feature_model(model: Any, taps: tuple[str, ...]) -> Any:
    """``model`` cut down to the outputs named by ``taps``."""
    import keras

    missing = [tap for tap in taps if tap not in model.output]
    if missing:
        raise SettingsError(f"unknown taps {missing}; {model.name} has {sorted(model.output)}")
    return keras.Model(model.input, {tap: model.output[tap] for tap in taps}, name=model.name)
