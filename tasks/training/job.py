"""The runner of one (dataset, method) job: train it on Ray Train, then write its artifacts.

:func:`run_job` is a plain function; :data:`run_job_task` is its thin ``ray.remote`` wrapper,
which the workflow pins to the driver's node (with the :class:`JobBoard`), so losing a worker
node never takes a job's runner with it. The workers checkpoint every epoch under
``<runs>/_ray/<dataset>-<method>/``: Ray Train restarts lost workers from there
(``max_failures``), and running the same command again resumes a job that was killed.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import ray

from storage.lease import Lease
from tasks.backbones import ResolvedWeights, get_backbone
from tasks.evaluation import classification_metrics, plot_confusion_matrix, plot_learning_curves
from tasks.heads import probabilities
from tasks.methods import JobContext, Method, get_method
from tasks.training.inputs import read_rows
from tasks.training.weights import set_named_weights
from tasks.training.worker import Checkpoint, train_loop_per_worker


@dataclass(frozen=True)
class JobResult:
    dataset: str
    method: str
    status: str  # "done", "kept", "failed" or "skipped"
    accuracy: float | None = None
    loss: float | None = None
    epochs: int = 0
    resumed_from_epoch: int = 0
    seconds: float = 0.0
    seconds_per_epoch: float | None = None
    workers_in_sync: bool | None = None
    nodes: tuple[str, ...] = ()
    error: str = ""
    model_path: str = ""

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.method}"


def backbone_weights(context: JobContext, method: Method) -> dict[str, ResolvedWeights]:
    """The weights of every backbone the method builds (none for a method on images)."""
    if not method.taps:
        return {}
    stores = context.stores if method.all_backbones else context.stores[:1]
    return {s.backbone: get_backbone(s.backbone).resolve_weights(s.weights_source) for s in stores}


def _train(context: JobContext, board: Any, initial: Any) -> Checkpoint:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    options = context.options
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"context": context, "board": board, "initial_weights": initial},
        scaling_config=ScalingConfig(
            num_workers=options.workers,
            use_gpu=options.use_gpu,
            resources_per_worker={"CPU": options.threads},
        ),
        run_config=RunConfig(
            name=context.run_name,
            storage_path=context.runs.ray_storage,
            storage_filesystem=context.runs.location.filesystem,
            failure_config=FailureConfig(max_failures=options.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        return Checkpoint.load(folder)


def validation_metrics(
    context: JobContext, method: Method, trained: dict[str, list[np.ndarray]]
) -> dict[str, Any]:
    """Accuracy, loss, per-class metrics and the confusion matrix on the validation split's
    original images, from the trained part of the model (the same numbers the complete model
    gives on the images: tested)."""
    import keras

    if not context.has_split("validation"):
        return {}
    rows = read_rows(context, method, "validation", first_copy_only=True)
    model = method.build_trainable(keras, context)
    set_named_weights(model, trained)
    outputs = model.predict(rows.x, batch_size=64, verbose=0)
    return classification_metrics(
        rows.y, probabilities(outputs, len(context.classes)), context.classes
    )


def run_job(context: JobContext, board: Any) -> JobResult:
    """Train one job on Ray Train and write its artifacts; raises on failure."""
    started = time.perf_counter()
    method = get_method(context.method)
    files = context.runs.job(context.dataset, context.method)
    runs = context.runs
    lease = Lease(
        runs.location.filesystem,
        runs.lease_path(context.dataset, context.method),
        f"runs {files.display('')}",
        command="wf train-all",
    )
    with lease:
        weights = backbone_weights(context, method)
        initial = method.initial_weights(context, weights)
        checkpoint = _train(context, board, ray.put(initial) if initial is not None else None)
        lease.check()
        kept_best = context.options.keep_best and checkpoint.best_weights is not None
        trained = checkpoint.best_weights if kept_best else checkpoint.weights
        facts = ray.get(board.get.remote(context.key))
        digests = [v for k, v in facts.items() if k.startswith("digest/")]
        nodes = tuple(sorted({v for k, v in facts.items() if k.startswith("node/")}))
        in_sync = (len(set(digests)) == 1 and len(digests) == context.options.workers
                   if context.options.workers > 1 else None)  # fmt: skip
        metrics = validation_metrics(context, method, trained)
        state = checkpoint.state
        history = state["log"]["history"]
        seconds = history.get("seconds") or []
        metrics.update(
            dataset=context.dataset,
            method=context.method,
            epochs=state["log"]["epoch"],
            best_epoch=state["best"]["best_epoch"],
            best_val_loss=state["best"]["best_val_loss"],
            kept="best" if kept_best else "last",
            **{
                k: state["final"][k]
                for k in ("rows_per_epoch", "steps_per_epoch", "optimizer_steps")
            },
            resumed_from_epoch=state["final"]["resumed_from"],
            epoch_copies=context.options.epoch_copies,
            workers=context.options.workers,
            workers_in_sync=in_sync,
            nodes=list(nodes),
            seconds=round(time.perf_counter() - started, 3),
            finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
            seconds_per_epoch=round(float(np.mean(seconds)), 4) if seconds else None,
            manifest_ids={s.backbone: s.manifest_id for s in context.stores},
        )
        _write_artifacts(context, method, trained, weights, metrics, history)
    return JobResult(
        context.dataset, context.method, "done", metrics.get("accuracy"), metrics.get("loss"),
        metrics["epochs"], metrics["resumed_from_epoch"], metrics["seconds"],
        metrics["seconds_per_epoch"], in_sync, nodes, model_path=files.display("model.keras"),
    )  # fmt: skip


def _write_artifacts(
    context: JobContext, method: Method, trained: dict[str, list[np.ndarray]],
    weights: dict[str, ResolvedWeights], metrics: dict[str, Any], history: dict[str, list[float]],
) -> None:  # fmt: skip
    files = context.runs.job(context.dataset, context.method)
    model = method.complete_model(context, trained, weights)
    metrics["input_size"] = [int(d) for d in model.input_shape[1:3]]  # what `wf serve` decodes to
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        model.save(path)
        with open(path, "rb") as handle:
            files.write("model.keras", handle.read())
    files.write_weights("trained_weights.npz", trained)
    files.write_json("metrics.json", metrics)
    files.write_json("classes.json", list(context.classes))
    files.write_json("settings.json", job_settings(context))
    files.write_history(history)
    title = f"{context.dataset} / {context.method}"
    files.write("learning_curves.png", plot_learning_curves(history, title))
    names = ["model.keras", "trained_weights.npz", "metrics.json", "classes.json",
             "settings.json", "history.csv", "learning_curves.png"]  # fmt: skip
    if metrics.get("confusion_matrix"):
        files.write("confusion_matrix.png", plot_confusion_matrix(metrics, title))
        names.append("confusion_matrix.png")
    for name, data in tensorboard_events(history).items():
        files.write(f"tensorboard/{name}", data)
        names.append(f"tensorboard/{name}")
    files.write_index(names)


def tensorboard_events(history: dict[str, list[float]]) -> dict[str, bytes]:
    """The job's history as TensorBoard event files (``train/`` and ``validation/`` runs, as
    Keras's own TensorBoard callback lays them out), by relative name. Written with tensorboardX
    (Ray Tune's dependency: TensorFlow's ``tf.summary`` needs the tensorboard package) to a
    temporary folder, then stored through storage like every other artifact."""
    from tensorboardX import SummaryWriter

    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as folder:
        for run, prefix in (("train", ""), ("validation", "val_")):
            writer = SummaryWriter(os.path.join(folder, run))
            for key, values in history.items():
                if (
                    key == "seconds"
                    or not key.startswith(prefix)
                    or (not prefix and key.startswith("val_"))
                ):
                    continue
                for epoch, value in enumerate(values):
                    writer.add_scalar(f"epoch_{key.removeprefix(prefix)}", value, epoch)
            writer.close()
        for root, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as handle:
                    out[os.path.relpath(path, folder)] = handle.read()
    return out


def job_settings(context: JobContext) -> dict[str, Any]:
    """The job's settings as JSON: recipe, options, and each store it read (no file lists)."""
    return {
        "dataset": context.dataset,
        "method": context.method,
        "classes": list(context.classes),
        "dataset_root": context.dataset_root,
        "recipe": dataclasses.asdict(context.recipe),
        "options": dataclasses.asdict(context.options),
        "stores": [
            {k: v for k, v in dataclasses.asdict(s).items() if k != "files"} for s in context.stores
        ],
    }


@ray.remote(num_cpus=0)
class JobBoard:
    """Per-job facts that workers post (epochs done, weight digests, nodes) for the driver."""

    def __init__(self) -> None:
        self._facts: dict[str, dict[str, Any]] = {}

    def set(self, job: str, key: str, value: Any) -> None:
        self._facts.setdefault(job, {})[key] = value

    def get(self, job: str) -> dict[str, Any]:
        return dict(self._facts.get(job, {}))

    def all(self) -> dict[str, dict[str, Any]]:
        return {job: dict(facts) for job, facts in self._facts.items()}


run_job_task = ray.remote(num_cpus=0, max_retries=0)(run_job)
