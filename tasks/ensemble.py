"""`wf train-all --ensemble`: a dataset's cross-validated methods averaged into one saved model.

Cross-validation tests the average of the methods' calibrated out-of-fold probabilities against
the best method alone (``cv.choice.ensemble``). When it is asked for (and, unless
``--ensemble always``, right more often than the best method beyond noise), this builds
``<runs>/<dataset>/ensemble/`` like any job's folder: ``model.keras`` takes an image and gives
the average of the members' (calibrated) probabilities, one output, loaded with plain
``keras.saving.load_model``; ``metrics.json`` holds its validation numbers (the saved model run
on the validation images), its cross-validated numbers and its abstention threshold (on
confidence alone: the members' embeddings differ, so there is no one distance to measure).
Runs in a worker of the engine's pool, which has TensorFlow imported.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import numpy as np

from storage.errors import SettingsError
from storage.filesystem import Location
from storage.runs import Artifact, JobMetrics, RunsLayout
from tasks.evaluation import classification_metrics, plot_confusion_matrix
from tasks.heads import probabilities
from tasks.images import load_image

ENSEMBLE = "ensemble"
BATCH = 32
# What metrics.json's "cv" keeps of cross-validation's test of the average.
CV_KEYS = ("folds", "accuracy", "interval", "n", "against", "only_ensemble", "only_best",
           "p_value", "beats_best", "splits")  # fmt: skip


def ensemble_model(keras: Any, members: list[tuple[str, Any]]) -> Any:
    """One model of ``members`` (``(name, complete model)``): the image in at the largest of
    their input sizes, resized for each member that takes a smaller one, their outputs
    averaged."""
    sizes = [tuple(int(d) for d in model.input_shape[1:3]) for _, model in members]
    size = max(sizes)
    image = keras.Input((*size, 3), name="image")
    outputs = []
    for (name, model), own in zip(members, sizes, strict=True):
        x = image if own == size else keras.layers.Resizing(*own, name=f"{name}_resize")(image)
        # A model of its own name around each member (one input, one output): the outer
        # model's layers are then the image, the resizings, the members and the average.
        wrapped = keras.Model(model.inputs[0], model.outputs[0], name=f"member_{name}")
        outputs.append(wrapped(x))
    average = keras.layers.Average(name="ensemble_average")(outputs)
    return keras.Model(image, average, name=ENSEMBLE)


def build_ensemble(
    runs: RunsLayout, dataset: str, members: list[str], classes: list[str],
    dataset_root: str, validation: list[tuple[str, int]], cv: dict[str, Any],
) -> JobMetrics:  # fmt: skip
    """Save ``members``' average as ``<runs>/<dataset>/ensemble/`` and return its metrics.
    ``validation``: each validation image's path (relative to ``dataset_root``) and label;
    ``cv``: cross-validation's ``choice.ensemble`` (with its ``abstain`` thresholds) and the
    ``folds`` it was measured in."""
    import keras

    from tasks.classifier import load_trained_model
    from tasks.training.job import predict_in_batches

    started = time.perf_counter()
    loaded = [(m, load_trained_model(runs.job(dataset, m).model).model) for m in members]
    onnx = [m for m, model in loaded if not isinstance(model, keras.Model)]
    if onnx:
        raise SettingsError(f"an ensemble of ONNX models is not built yet: {', '.join(onnx)}")
    model = ensemble_model(keras, loaded)
    size = tuple(int(d) for d in model.input_shape[1:3])
    location = Location.at(dataset_root)
    pixels = np.stack([load_image(location.filesystem, location.path(p), size)
                       for p, _ in validation])  # fmt: skip
    found = predict_in_batches(model, pixels.astype(np.float32), BATCH)
    metrics = JobMetrics(dataset, ENSEMBLE, members=list(members), epochs=0,
                         input_size=[int(d) for d in size], abstain=cv.get("abstain"),
                         # .get: a kept job's older choice has no "splits"
                         cv={key: cv.get(key) for key in CV_KEYS},
                         finished_at=datetime.now(UTC).isoformat(timespec="seconds"))  # fmt: skip
    labels = np.array([label for _, label in validation])
    metrics.update(**classification_metrics(labels, probabilities(found, len(classes)), classes))
    files = runs.job(dataset, ENSEMBLE)
    files.write_model(model)
    metrics.seconds = round(time.perf_counter() - started, 3)
    files.write_metrics(metrics)
    files.write_json(Artifact.CLASSES, list(classes))
    files.write(Artifact.CONFUSION_MATRIX,
                plot_confusion_matrix(metrics.to_json(), f"{dataset} / {ENSEMBLE}"))  # fmt: skip
    files.write_index([Artifact.MODEL, Artifact.METRICS, Artifact.CLASSES,
                       Artifact.CONFUSION_MATRIX])  # fmt: skip
    return metrics
