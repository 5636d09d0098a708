"""Run artifacts: where each training job's files live, written atomically.

``<runs>/<dataset>/<method>/`` holds ``model.keras`` (images in, class probabilities out),
``classes.json``, ``metrics.json``, ``history.csv``, ``settings.json``, the PNG plots, and
``trained_weights.npz`` (the trained layers, by name, for the jobs that build on this one).
``<runs>/summary.md`` and ``summary.html`` compare every job. Ray Train's own checkpoints go
under ``<runs>/_ray/``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

import numpy as np

from storage.errors import StoreError

METHODS = ("bottleneck", "finetune", "scratch")


class JobFiles:
    """Paths of one (dataset, method) job's artifacts."""

    def __init__(self, runs: str, dataset: str, method: str) -> None:
        self.dir = os.path.join(os.path.abspath(runs), dataset, method)
        self.dataset = dataset
        self.method = method

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    @property
    def model(self) -> str:
        return self.path("model.keras")

    @property
    def weights(self) -> str:
        return self.path("trained_weights.npz")

    def exists(self) -> bool:
        return os.path.exists(self.path("metrics.json")) and os.path.exists(self.model)


def ray_storage_dir(runs: str) -> str:
    return os.path.join(os.path.abspath(runs), "_ray")


def write_bytes(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = (
        f"{os.path.join(os.path.dirname(path), '.' + os.path.basename(path))}.tmp-{os.getpid()}"
    )
    with open(temporary, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


def write_json(path: str, value: Any) -> None:
    write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str) -> Any:
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise StoreError(f"{path} does not exist") from None


def write_history_csv(path: str, history: dict[str, list[float]]) -> None:
    keys = sorted(history)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["epoch", *keys])
    for epoch in range(max((len(v) for v in history.values()), default=0)):
        writer.writerow(
            [epoch + 1, *(history[k][epoch] if epoch < len(history[k]) else "" for k in keys)]
        )
    write_bytes(path, out.getvalue().encode())


def save_named_weights(path: str, weights: dict[str, list[np.ndarray]]) -> None:
    """``{layer name: [arrays]}`` as one ``.npz`` (keys ``<layer>/<index>``)."""
    flat = {
        f"{name}/{i}": array for name, arrays in weights.items() for i, array in enumerate(arrays)
    }
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    write_bytes(path, buffer.getvalue())


def load_named_weights(path: str) -> dict[str, list[np.ndarray]]:
    with np.load(path) as data:
        grouped: dict[str, dict[int, np.ndarray]] = {}
        for key in data.files:
            name, index = key.rsplit("/", 1)
            grouped.setdefault(name, {})[int(index)] = data[key]
    return {name: [arrays[i] for i in sorted(arrays)] for name, arrays in grouped.items()}
