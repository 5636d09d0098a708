"""Run artifacts: where each training job's files live, written through :mod:`storage.filesystem`
so a runs folder may be a local path or an object-store URI.

``<runs>/<dataset>/<method>/`` holds ``model.keras`` (images in, class probabilities out),
``classes.json``, ``metrics.json``, ``history.csv``, ``settings.json``, the PNG plots,
``trained_weights.npz`` (the trained layers, by name, for the jobs that build on this one) and,
written last, ``artifacts.json``: the size and SHA-256 of every other file, which makes the job
count as done. ``<runs>/summary.md`` and ``summary.html`` compare every job. A job trained by
the run's worker pool checkpoints every epoch under ``<runs>/_checkpoints/<dataset>-<method>/``
(:class:`JobCheckpoints`); a job trained in sync on several Ray Train workers checkpoints under
``<runs>/_ray/``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from storage.errors import StoreError
from storage.filesystem import (
    Location,
    delete_folder,
    file_info,
    list_folders,
    read_bytes,
    write_bytes,
)
from storage.hashing import sha256_stream

ARTIFACT_INDEX = "artifacts.json"


def job_key(dataset: str, method: str) -> str:
    """A job's key: ``dataset/method`` (its folder under the runs root)."""
    return f"{dataset}/{method}"


def split_job_key(key: str) -> tuple[str, str]:
    """``(dataset, method)`` of a :func:`job_key`."""
    dataset, method = key.split("/", 1)
    return dataset, method


def job_run_name(dataset: str, method: str) -> str:
    """A job's name where a slash cannot go: its Ray Train run, its served model."""
    return f"{dataset}-{method}"


class Artifact:
    """The file names of a job's artifacts: spelled here and nowhere else."""

    MODEL = "model.keras"
    ONNX_MODEL = "model.onnx"  # instead of model.keras, for a job on an ONNX backbone
    METRICS = "metrics.json"
    CLASSES = "classes.json"
    SETTINGS = "settings.json"
    HISTORY = "history.csv"
    TRAINED_WEIGHTS = "trained_weights.npz"
    LEARNING_CURVES = "learning_curves.png"
    CONFUSION_MATRIX = "confusion_matrix.png"
    RELIABILITY = "reliability.png"  # with cross-validation: calibration before and after
    LABELS_CURVE = "labels_curve.png"  # with cross-validation: accuracy by labelled images
    EMBEDDINGS = "embeddings.npy"  # the labelled images' embeddings: out-of-distribution scores
    TENSORBOARD = "tensorboard"
    INDEX = ARTIFACT_INDEX


@dataclass
class JobMetrics:
    """A job's ``metrics.json``: what it measured and how it ran, read and written here alone
    (:meth:`JobFiles.metrics`, :meth:`JobFiles.write_metrics`). Validation numbers come from
    :func:`tasks.evaluation.classification_metrics`; ``cv``, ``ece`` and ``temperature`` from
    :class:`tasks.cross_validation.CrossValidated` (absent without ``--cv``); ``abstain`` from
    :class:`tasks.abstention.Abstention`. A key this version does not know is kept in ``extra``
    and written back, so a newer file survives an older reader."""

    dataset: str
    method: str
    # On the validation split's original images (None when the dataset has none).
    accuracy: float | None = None
    n: int | None = None  # read from ``examples`` in a file written before n
    accuracy_interval: list[float] | None = None  # 95% Wilson: [low, high]
    loss: float | None = None
    examples: int | None = None  # the same as n, still written for readers of files before n
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    confusion_matrix: list[list[int]] | None = None
    classes: list[str] = field(default_factory=list)
    # How it trained.
    epochs: int = 0
    best_epoch: int | None = None
    best_val_loss: float | None = None
    kept: str = "last"  # the weights saved: "last" or "best" (--keep-best)
    rows_per_epoch: int | None = None
    steps_per_epoch: int | None = None
    optimizer_steps: int | None = None
    resumed_from_epoch: int = 0
    epoch_copies: str | None = None  # "all" or "one" (--epoch-copies)
    workers: int = 1
    workers_in_sync: bool | None = None  # with 2 or more workers: every worker's weights alike
    nodes: list[str] = field(default_factory=list)
    seconds: float | None = None
    seconds_per_epoch: float | None = None
    finished_at: str = ""
    # What it read: each backbone's store manifest and labelled rows (retrain when they move).
    manifest_ids: dict[str, str] = field(default_factory=dict)
    store_ids: dict[str, str] = field(default_factory=dict)
    input_size: list[int] | None = None  # what the saved model takes: [height, width]
    abstain: dict[str, Any] | None = None
    # With --cv only (left out of the file without it).
    cv: dict[str, Any] | None = None
    ece: dict[str, Any] | None = None
    temperature: float | None = None
    members: list[str] | None = None  # an ensemble's methods
    extra: dict[str, Any] = field(default_factory=dict)

    OMITTED_WHEN_EMPTY = ("cv", "ece", "temperature", "members")

    @classmethod
    def names(cls) -> list[str]:
        """The keys it knows: every field but ``extra``."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> JobMetrics:
        names = set(cls.names())
        known = {k: v for k, v in value.items() if k in names}
        if known.get("n") is None and known.get("examples") is not None:
            known["n"] = known["examples"]  # a file written before n
        return cls(**{"dataset": "", "method": "", **known},
                   extra={k: v for k, v in value.items() if k not in names})  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.names()}
        for name in self.OMITTED_WHEN_EMPTY:
            if out[name] is None:
                del out[name]
        return {**self.extra, **out}

    def update(self, **values: Any) -> None:
        """Set fields by name (a :func:`classification_metrics` dict, cross-validation's
        entries); an unknown name is kept in ``extra``."""
        names = set(self.names())
        for name, value in values.items():
            if name in names:
                setattr(self, name, value)
            else:
                self.extra[name] = value


class JobFiles:
    """The artifacts of one (dataset, method) job."""

    def __init__(self, location: Location, dataset: str, method: str) -> None:
        self.location, self.dataset, self.method = location, dataset, method
        self.dir = location.path(dataset, method)

    def path(self, name: str) -> str:
        return f"{self.dir}/{name}"

    def display(self, name: str) -> str:
        return self.location.display(self.path(name))

    @property
    def model_name(self) -> str:
        """The job's model file: ``model.onnx`` where its index lists one, else ``model.keras``."""
        try:
            index = self.index()
        except StoreError:
            return Artifact.MODEL
        return Artifact.ONNX_MODEL if Artifact.ONNX_MODEL in index else Artifact.MODEL

    @property
    def model(self) -> str:
        return self.path(self.model_name)

    def metrics(self) -> JobMetrics:
        """``metrics.json``: what the job measured and how it ran."""
        value = self.read_json(Artifact.METRICS)
        if not isinstance(value, dict):
            raise StoreError(f"{self.display(Artifact.METRICS)} is not a JSON object")
        return JobMetrics.from_json(value)

    def write_metrics(self, metrics: JobMetrics) -> None:
        self.write_json(Artifact.METRICS, metrics.to_json())

    def classes(self) -> list[str]:
        return list(self.read_json(Artifact.CLASSES))

    def exists(self) -> bool:
        """Done: its artifact index (written last) is there."""
        return file_info(self.location.filesystem, self.path(ARTIFACT_INDEX)) is not None

    def write(self, name: str, data: bytes) -> None:
        write_bytes(self.location.filesystem, self.path(name), data)

    def write_model(self, model: Any) -> str:
        """``model.keras``: a Keras model saved to a local file (Keras saves to paths only),
        then stored like every artifact; a model that names its own ``artifact``
        (``model.onnx``) is saved under that name. Returns the name."""
        import os
        import tempfile

        name = getattr(model, "artifact", Artifact.MODEL)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, name)
            model.save(path)
            with open(path, "rb") as handle:
                self.write(name, handle.read())
        return name

    def read(self, name: str) -> bytes:
        try:
            return read_bytes(self.location.filesystem, self.path(name))
        except FileNotFoundError:
            raise StoreError(f"{self.display(name)} does not exist") from None

    def write_json(self, name: str, value: Any) -> None:
        self.write(name, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    def read_json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name))
        except ValueError as error:
            raise StoreError(f"{self.display(name)} is not valid JSON: {error}") from None

    def write_history(self, history: dict[str, list[float]]) -> None:
        keys = sorted(history)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["epoch", *keys])
        for epoch in range(max((len(v) for v in history.values()), default=0)):
            writer.writerow(
                [epoch + 1, *(history[k][epoch] if epoch < len(history[k]) else "" for k in keys)]
            )
        self.write(Artifact.HISTORY, out.getvalue().encode())

    def write_weights(self, name: str, weights: dict[str, list[np.ndarray]]) -> None:
        self.write(name, named_weights_to_bytes(weights))

    def read_weights(self, name: str) -> dict[str, list[np.ndarray]]:
        return named_weights_from_bytes(self.read(name))

    def write_index(self, names: list[str]) -> None:
        """Record the size and SHA-256 of ``names`` (already written); the job is then done."""
        index = {}
        for name in names:
            data = self.read(name)
            index[name] = {"bytes": len(data), "sha256": sha256_stream([data])}
        self.write_json(ARTIFACT_INDEX, index)

    def index(self) -> dict[str, dict[str, Any]]:
        return self.read_json(ARTIFACT_INDEX)

    def remove(self) -> None:
        delete_folder(self.location.filesystem, self.dir)


class RunsLayout:
    """Where the artifacts of every job of a runs folder live."""

    def __init__(self, runs: str | Location) -> None:
        self.location = runs if isinstance(runs, Location) else Location.at(runs)

    def job(self, dataset: str, method: str) -> JobFiles:
        return JobFiles(self.location, dataset, method)

    def lease_path(self, dataset: str, method: str) -> str:
        return self.location.path(dataset, method, "_lease.json")

    @property
    def ray_storage(self) -> str:
        """Ray Train's storage path, as its ``storage_filesystem`` names it."""
        return self.location.path("_ray")

    def ray_run_dir(self, run_name: str) -> str:
        return self.location.path("_ray", run_name)

    def checkpoints(self, dataset: str, method: str) -> JobCheckpoints:
        return JobCheckpoints(self.location, job_run_name(dataset, method))

    def summary_path(self, name: str) -> str:
        return self.location.path(name)

    def write(self, name: str, data: bytes) -> None:
        write_bytes(self.location.filesystem, self.summary_path(name), data)

    def jobs(self) -> list[JobFiles]:
        """Every job folder that has finished artifacts."""
        found = []
        for dataset in list_folders(self.location.filesystem, self.location.root):
            if dataset.startswith(("_", ".")):
                continue
            for method in list_folders(self.location.filesystem, self.location.path(dataset)):
                job = self.job(dataset, method)
                if job.exists():
                    found.append(job)
        return found


@dataclass
class FinalCounts:
    """What the end of a job's training counted (its last checkpoint's ``final``)."""

    resumed_from: int  # the epoch this run of it started at (0: from the start)
    rows_per_epoch: int
    steps_per_epoch: int
    optimizer_steps: int


@dataclass
class CheckpointState:
    """A checkpoint's ``state.json``: each epoch callback's state as its constructor takes it
    back (``EpochLog(**log)``, ``BestEpoch(**best)``, ``StopWithoutProgress(**stop)``), and
    the final counts once training ended."""

    log: dict[str, Any] = field(default_factory=dict)  # history, epoch
    best: dict[str, Any] = field(default_factory=dict)  # best_val_loss, best_epoch
    stop: dict[str, Any] | None = None  # best, waited: with early stopping only
    final: FinalCounts | None = None

    @property
    def epoch(self) -> int:
        return int(self.log.get("epoch", 0))

    @property
    def history(self) -> dict[str, list[float]]:
        return self.log.get("history", {})

    @property
    def best_epoch(self) -> int | None:
        return self.best.get("best_epoch")

    @property
    def best_val_loss(self) -> float | None:
        return self.best.get("best_val_loss")

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> CheckpointState:
        value = json.loads(data)
        final = value.get("final")
        return cls(value.get("log", {}), value.get("best", {}), value.get("stop"),
                   FinalCounts(**final) if final else None)  # fmt: skip


class JobCheckpoints:
    """One job's epoch checkpoints: each epoch's files in a folder of their own
    (``epoch-000007/``), then ``latest.json`` naming it, written last; so a job killed while it
    writes one finds the one before, whole. Older folders are deleted once the pointer moves."""

    POINTER = "latest.json"

    def __init__(self, location: Location, name: str) -> None:
        self.location = location
        self.dir = location.path("_checkpoints", name)

    def save(self, epoch: int, files: dict[str, bytes]) -> None:
        folder = f"epoch-{epoch:06d}"
        fs = self.location.filesystem
        for name, data in files.items():
            write_bytes(fs, f"{self.dir}/{folder}/{name}", data)
        previous = self._pointer()
        write_bytes(fs, f"{self.dir}/{self.POINTER}",
                    json.dumps({"folder": folder, "files": sorted(files)}).encode())  # fmt: skip
        if previous and previous["folder"] != folder:
            delete_folder(fs, f"{self.dir}/{previous['folder']}")

    def _pointer(self) -> dict[str, Any] | None:
        try:
            return json.loads(read_bytes(self.location.filesystem, f"{self.dir}/{self.POINTER}"))
        except FileNotFoundError:
            return None

    def latest(self) -> dict[str, bytes] | None:
        """The files of the last whole checkpoint, or None when there is none."""
        pointer = self._pointer()
        if pointer is None:
            return None
        fs = self.location.filesystem
        return {n: read_bytes(fs, f"{self.dir}/{pointer['folder']}/{n}") for n in pointer["files"]}

    def remove(self) -> None:
        delete_folder(self.location.filesystem, self.dir)


def named_weights_to_bytes(weights: dict[str, list[np.ndarray]]) -> bytes:
    """``{layer name: [arrays]}`` as one ``.npz`` (keys ``<layer>/<index>``)."""
    flat = {f"{name}/{i}": a for name, arrays in weights.items() for i, a in enumerate(arrays)}
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    return buffer.getvalue()


def named_weights_from_bytes(data: bytes) -> dict[str, list[np.ndarray]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        grouped: dict[str, dict[int, np.ndarray]] = {}
        for key in archive.files:
            name, index = key.rsplit("/", 1)
            grouped.setdefault(name, {})[int(index)] = archive[key]
    return {name: [arrays[i] for i in sorted(arrays)] for name, arrays in grouped.items()}
