"""The backbone registry: every pretrained base wf can extract with, by name.

Each backbone is an object (:class:`tasks.backbones.base.Backbone`) that knows its input size,
taps, preprocessing and weights; an unknown name is an error, never a silent default.
"""

from __future__ import annotations

from typing import Any

from storage.errors import SettingsError
from tasks.backbones.base import TAP_DESCRIPTIONS, Backbone, ResolvedWeights
from tasks.backbones.efficientnet_lite import LITE_BACKBONES
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
]


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise SettingsError(
            f"unknown backbone {name!r}; choose one of {', '.join(sorted(BACKBONES))}"
        ) from None


def feature_model(model: Any, taps: tuple[str, ...]) -> Any:
    """``model`` cut down to the outputs named by ``taps``."""
    import keras

    missing = [tap for tap in taps if tap not in model.output]
    if missing:
        raise SettingsError(f"unknown taps {missing}; {model.name} has {sorted(model.output)}")
    return keras.Model(model.input, {tap: model.output[tap] for tap in taps}, name=model.name)
