"""A model that can say "I don't know": two thresholds, chosen on held-out images for a stated
in-distribution abstention rate, written beside the model in its run.

- **Low confidence**: the model's top (calibrated) probability is below ``min_confidence``.
- **Out of distribution**: the image's embedding (the input of the model's top: pooled
  ImageNet features for the methods on stored taps, the fine-tuned block's for finetune, the
  convnet's flattened features for scratch) is farther than ``max_distance`` from the labelled
  images the run saw: the mean ``1 - cosine`` to its 10 nearest. The embeddings are stored as
  ``embeddings.npy`` (unit length, float16) beside the model.

The thresholds are chosen on images the model (and the embeddings' bank) never saw:
cross-validation's out-of-fold images where it ran (its validation images alone when they
score below the training ones: ``tasks.cross_validation.split_agreement``), else the validation
split. Half of the
rate goes to the distance (its ``1 - rate/2`` quantile), then the confidence threshold is set
so that the two together decline ``rate`` of those images.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tasks.audit import normalise

LOW_CONFIDENCE, OUT_OF_DISTRIBUTION = "low_confidence", "out_of_distribution"
DEFAULT_RATE = 0.05
BLOCK = 2048
# The out-of-distribution score averages the distance to this many nearest labelled images:
# on flowers (benchmarks/honest_numbers.py) its AUROC against cats_vs_dogs photos was 0.996,
# against 0.979 for the nearest one alone, and it declined all of them at the same in-
# distribution rate instead of 82% (k-NN out-of-distribution detection, Sun et al., 2022).
NEIGHBOURS = 10


@dataclass(frozen=True)
class Abstention:
    """The thresholds in force, and what they were chosen for (``metrics.json``'s ``abstain``)."""

    min_confidence: float
    max_distance: float | None  # None: no embeddings, confidence only
    rate: float  # the in-distribution abstention rate they were chosen for
    chosen_on: str  # "out-of-fold", "out-of-fold validation", "validation" or "options"
    n: int  # held-out images they were chosen on

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any] | None) -> Abstention | None:
        if not value:
            return None
        return cls(float(value["min_confidence"]),
                   None if value.get("max_distance") is None else float(value["max_distance"]),
                   float(value["rate"]), str(value["chosen_on"]), int(value["n"]))  # fmt: skip

    def decide(
        self, probabilities: np.ndarray, distance: np.ndarray | None
    ) -> list[tuple[bool, str]]:
        """Per image: ``(abstained, reason)``; out of distribution wins over low confidence."""
        confidence = np.asarray(probabilities).max(axis=1)
        out = []
        for i, top in enumerate(confidence):
            far = distance is not None and self.max_distance is not None
            if far and distance[i] > self.max_distance:  # type: ignore[index,operator]
                out.append((True, OUT_OF_DISTRIBUTION))
                continue
            out.append((True, LOW_CONFIDENCE) if top < self.min_confidence else (False, ""))
        return out


def nearest_distance(embeddings: np.ndarray, bank: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """The mean ``1 - cosine`` from each (unit-length) embedding to its ``k`` nearest in
    ``bank`` (all of it when it has fewer)."""
    bank = np.asarray(bank, np.float32)
    k = max(1, min(k, len(bank)))
    out = np.empty(len(embeddings), np.float32)
    for start in range(0, len(embeddings), BLOCK):
        block = np.asarray(embeddings[start : start + BLOCK], np.float32) @ bank.T
        top = np.partition(block, len(bank) - k, axis=1)[:, len(bank) - k :]
        out[start : start + BLOCK] = 1.0 - top.mean(axis=1)
    return out


def out_of_fold_distance(embeddings: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Each image's distance to its nearest image of another fold: what a model trained on the
    other folds would see for it."""
    out = np.empty(len(embeddings), np.float32)
    for fold in np.unique(folds):
        held = folds == fold
        out[held] = nearest_distance(embeddings[held], embeddings[~held])
    return out


def choose(
    confidence: np.ndarray, distance: np.ndarray | None, rate: float, chosen_on: str
) -> Abstention:
    """Thresholds that decline ``rate`` of these held-out, in-distribution images."""
    confidence = np.asarray(confidence, np.float64)
    n = len(confidence)
    max_distance = None
    flagged = np.zeros(n, bool)
    if distance is not None and n:
        max_distance = float(np.quantile(distance, 1 - rate / 2))
        flagged = np.asarray(distance) > max_distance
    budget = int(np.floor(rate * n)) - int(flagged.sum())
    left = np.sort(confidence[~flagged])
    # Declining the `budget` least confident of the rest: a threshold just above the last.
    min_confidence = float(np.nextafter(left[budget - 1], 1.0)) if 0 < budget <= len(left) else 0.0
    return Abstention(min_confidence, max_distance, rate, chosen_on, n)  # not rounded: exact


def bank_bytes(embeddings: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, normalise(embeddings).astype(np.float16), allow_pickle=False)
    return buffer.getvalue()


def bank_from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)


def _holds(model: Any, layer: str) -> bool:
    return any(item.name == layer or (hasattr(item, "layers") and _holds(item, layer))
               for item in model.layers)  # fmt: skip


def embedding_model(keras_module: Any, model: Any, layer: str) -> Any:
    """``model`` with two outputs from one forward pass: its probabilities and the input of its
    layer ``layer`` (the embedding). ``layer`` may sit in ``model`` or in a model nested as its
    last layer, at any depth (the saved models nest the trained one, whose top may be nested
    too). Works with Keras 3 and tf-keras."""
    if any(item.name == layer for item in model.layers):
        return keras_module.Model(model.inputs, [model.output, model.get_layer(layer).input])
    inner = model.layers[-1]
    if not hasattr(inner, "layers") or not _holds(inner, layer):
        raise ValueError(f"{model.name} has no layer {layer!r} on its last model")
    both = embedding_model(keras_module, inner, layer)
    # The tensor the nested model was called on in this model's graph (kept on the call's node).
    called_on = inner._inbound_nodes[0].input_tensors
    if isinstance(called_on, list | tuple):  # Keras 3 keeps a list; tf-keras the tensor itself
        (called_on,) = called_on
    return keras_module.Model(model.inputs, both(called_on))
