"""What every backbone is: a pretrained convolutional base with its input size, named taps,
preprocessing inside the model, and weights resolved in one place.

A backbone module (one per family, as in ``keras/src/applications/``) defines a subclass and
the registry in :mod:`tasks.backbones` lists an instance; nothing else knows a backbone's name.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from storage.errors import SettingsError, WeightsError
from storage.filesystem import file_sha256

TAP_DESCRIPTIONS = {
    "bottleneck": "the base's final output, as the bottleneck method trains on it",
    "last_block_input": "the input of the base's last block, so fine-tuning skips frozen layers",
    "features": "the final feature map before pooling",
    "pooled": "the final feature map, globally average-pooled",
}
MIN_INPUT_SIZE = 32


@dataclass(frozen=True)
class ResolvedWeights:
    """Where a backbone's weights come from: ``source`` as the user said it, the local file that
    holds them (None for random weights) and that file's SHA-256."""

    source: str
    path: str | None
    sha256: str


class Backbone(ABC):
    """A pretrained base. Subclasses set the class attributes and build the Keras models."""

    name: str
    summary: str
    default_input_size: int
    taps: tuple[str, ...]
    offline_imagenet: bool
    default_taps: tuple[str, ...] = ("bottleneck", "last_block_input")

    @abstractmethod
    def imagenet_weights(self) -> str:
        """A local file with the ImageNet weights (fetched or found), or :class:`WeightsError`."""

    @abstractmethod
    def build(self, input_size: tuple[int, int], weights: ResolvedWeights,
              include_top: bool = False) -> Any:  # fmt: skip
        """The Keras 3 model taking RGB [0, 255] pixels, with one output per tap."""

    @abstractmethod
    def build_tail(self, keras_module: Any, input_shape: tuple[int, ...]) -> Any:
        """The last block, from the ``last_block_input`` tap to the ``bottleneck`` tap, built with
        ``keras_module`` (``keras`` or ``tf_keras``); its layer names match :meth:`build`'s, so
        weights move between the two by name."""

    def resolve_weights(self, weights: str) -> ResolvedWeights:
        """Turn ``imagenet``, ``none`` or a file path into a local file and its checksum."""
        if weights == "none":
            return ResolvedWeights("none", None, "")
        if weights == "imagenet":
            path = self.imagenet_weights()
            return ResolvedWeights("imagenet", path, _sha256(path))
        path = os.path.abspath(os.path.expanduser(weights))
        if not os.path.isfile(path):
            raise WeightsError(f"weights {weights!r} is not 'imagenet', 'none' or an existing file")
        return ResolvedWeights(path, path, _sha256(path))

    def check_input_size(self, input_size: tuple[int, int]) -> None:
        if min(input_size) < MIN_INPUT_SIZE:
            raise SettingsError(
                f"input size must be at least {MIN_INPUT_SIZE} pixels: {input_size}"
            )


def _sha256(path: str) -> str:
    return file_sha256(pafs.LocalFileSystem(), path)
