"""One (dataset, method) job from its rows to its artifacts, two ways.

:func:`run_job_here` trains, scores and saves the job in the calling process: a long-lived
worker of the run's pool (:mod:`tasks.training.engine`), which imported TensorFlow once for
every job it runs. It checkpoints every epoch in the runs folder (:class:`JobCheckpoints`), so
a job whose worker died (its node lost) goes on from there on another worker, and the same
command run again resumes a job that was killed.

:func:`run_job` is for a job on several workers that train one model in sync: it starts a Ray
Train run for it (checkpoints under ``<runs>/_ray/<dataset>-<method>/``; Ray Train restarts
lost workers from there, ``max_failures``), then scores and saves the trained weights.
:data:`run_job_task` is its thin ``ray.remote`` wrapper, which the workflow pins to the
driver's node (with the :class:`JobBoard`), so losing a worker node never takes it.
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

from storage.errors import SettingsError
from storage.lease import Lease
from storage.runs import Artifact, JobFiles, JobMetrics, job_key
from tasks.abstention import (
    Abstention,
    bank_bytes,
    choose,
    embedding_model,
    nearest_distance,
)
from tasks.audit import normalise
from tasks.backbones import ResolvedWeights, is_onnx_store, store_backbone
from tasks.cross_validation import apply_temperature
from tasks.evaluation import (
    classification_metrics,
    plot_confusion_matrix,
    plot_learning_curve,
    plot_learning_curves,
    plot_reliability,
)
from tasks.heads import probabilities
from tasks.methods import JobContext, Method, get_method
from tasks.training.inputs import read_rows
from tasks.training.weights import set_named_weights
from tasks.training.worker import Checkpoint, train_loop_per_worker, train_model


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
    n: int | None = None  # validation images scored
    accuracy_interval: tuple[float, float] | None = None  # 95%, Wilson
    cv: dict[str, Any] | None = None  # metrics.json's "cv", when cross-validated

    @property
    def key(self) -> str:
        return job_key(self.dataset, self.method)

    @classmethod
    def from_artifacts(cls, files: JobFiles, status: str, error: str = "") -> JobResult:
        """A job that already has its artifacts, as its ``metrics.json`` tells it."""
        return cls.from_metrics(files, files.metrics(), status, error)

    @classmethod
    def from_metrics(
        cls, files: JobFiles, metrics: JobMetrics, status: str, error: str = ""
    ) -> JobResult:
        interval = metrics.accuracy_interval
        return cls(
            files.dataset, files.method, status, metrics.accuracy, metrics.loss, metrics.epochs,
            metrics.resumed_from_epoch, metrics.seconds or 0.0, metrics.seconds_per_epoch,
            metrics.workers_in_sync, tuple(metrics.nodes), error,
            files.display(files.model_name), metrics.n,
            tuple(interval) if interval else None, metrics.cv,  # type: ignore[arg-type]
        )  # fmt: skip


def backbone_weights(
    context: JobContext, method: Method, cache: dict | None = None
) -> dict[str, ResolvedWeights]:
    """The weights of every backbone the method builds (none for a method on images).
    ``cache``: a long-lived worker's, so each backbone's weights are resolved once for every
    job it runs (reading a backbone's packaged weights costs about a second)."""
    if not method.taps:
        return {}
    cache = {} if cache is None else cache
    stores = context.stores if method.all_backbones else context.stores[:1]
    for s in stores:
        key = (s.backbone, s.weights_source)
        if key not in cache:
            backbone = store_backbone(s.backbone, s.weights_source)
            resolved = backbone.resolve_weights(s.weights_source)
            if is_onnx_store(s.weights_source) and (
                resolved.sha256 != s.weights_sha256
                or getattr(backbone, "preprocessing", "") != s.preprocessing
            ):
                raise SettingsError(f"{s.weights_source} or its sidecar changed since its store "
                                    "was extracted: run `wf extract` again")  # fmt: skip
            cache[key] = resolved
    return {s.backbone: cache[(s.backbone, s.weights_source)] for s in stores}


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


def validation_metrics(context: JobContext, method: Method, model: Any) -> dict[str, Any]:
    """Accuracy (with its count and interval), loss, per-class metrics and the confusion matrix
    on the validation split's original images, from the trained part of the model (``model``,
    holding the weights the job keeps: the same numbers the complete model gives on the images,
    tested), calibrated as the saved model is when the job was cross-validated."""
    if not context.has_split("validation"):
        return {}
    rows = read_rows(context, method, "validation", first_copy_only=True)
    found = probabilities(predict_in_batches(model, rows.x), len(context.classes))
    if context.cv is not None:
        found = apply_temperature(found, context.cv.temperature)
    return classification_metrics(rows.y, found, context.classes)


def calibrated(
    context: JobContext, method: Method, trained: dict[str, list[np.ndarray]]
) -> dict[str, list[np.ndarray]]:
    """The trained weights of the model to save: with cross-validation, the output layer's
    kernel and bias divided by the fitted temperature (its logits / T, so the saved model's one
    output is the calibrated probabilities, loaded with plain ``keras.saving.load_model``)."""
    if context.cv is None or not method.output_name or method.output_name not in trained:
        return trained
    scale = 1.0 / context.cv.temperature
    return {**trained, method.output_name: [w * scale for w in trained[method.output_name]]}


def abstention_for(
    context: JobContext, method: Method, scored: Any
) -> tuple[Abstention | None, np.ndarray | None]:
    """The thresholds the saved model declines by and the embeddings of the labelled images it
    measures distance to (:mod:`tasks.abstention`): from cross-validation's out-of-fold images
    when it ran (its validation ones alone when they score below the training ones; the bank
    then holds train and validation), else chosen here on the validation
    split against a bank of the training images; ``(None, None)`` with neither."""
    import keras
    import tf_keras

    if not method.embedding_layer:
        return None, None
    # The pool scores a tf-keras model; a Ray Train job, a Keras 3 one.
    both = embedding_model(keras if isinstance(scored, keras.Model) else tf_keras, scored,
                           method.embedding_layer)  # fmt: skip
    cv = context.cv.abstain if context.cv is not None else None
    splits = ("train", "validation") if cv else ("train",)
    embedded = [
        _embed(both, read_rows(context, method, s, first_copy_only=True).x)[1]
        for s in splits if context.has_split(s)
    ]  # fmt: skip
    bank = normalise(np.concatenate(embedded))
    if cv:
        return Abstention.from_json(cv), bank
    if not context.has_split("validation"):
        return None, bank
    rows = read_rows(context, method, "validation", first_copy_only=True)
    found, embedding = _embed(both, rows.x)
    found = probabilities(found, len(context.classes))
    if context.cv is not None:
        found = apply_temperature(found, context.cv.temperature)
    distance = nearest_distance(normalise(embedding), bank)
    return choose(found.max(axis=1), distance, context.options.abstain_rate, "validation"), bank


def _embed(model: Any, x: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A two-output model's outputs in inference mode, a batch at a time."""
    parts = [model(x[i : i + batch], training=False) for i in range(0, len(x), batch)]
    return (np.concatenate([np.asarray(p[0]) for p in parts]),
            np.concatenate([np.asarray(p[1]) for p in parts]))  # fmt: skip


def predict_in_batches(model: Any, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """``model(x)`` in inference mode, a batch at a time: no ``predict`` function to trace for a
    model that is called once (a fresh job's or a small fit's)."""
    outputs = [np.asarray(model(x[i : i + batch], training=False)) for i in range(0, len(x), batch)]
    return np.concatenate(outputs) if outputs else np.zeros((0,))


def _lease(context: JobContext, wait: bool = False) -> Lease:
    runs = context.runs
    return Lease(
        runs.location.filesystem,
        runs.lease_path(context.dataset, context.method),
        f"runs {runs.job(context.dataset, context.method).display('')}",
        command="wf train-all",
        wait=wait,
    )


def run_job(context: JobContext, board: Any) -> JobResult:
    """Train one job on several Ray Train workers in sync and write its artifacts; raises on
    failure."""
    import keras

    started = time.perf_counter()
    method = get_method(context.method)
    with _lease(context) as lease:
        weights = backbone_weights(context, method)
        initial = method.initial_weights(context, weights)
        checkpoint = _train(context, board, ray.put(initial) if initial is not None else None)
        lease.check()
        kept_best = context.options.keep_best and checkpoint.best_weights is not None
        trained = checkpoint.best_weights if kept_best else checkpoint.weights
        posted: JobPosts = ray.get(board.get.remote(context.key))
        digests = list(posted.digests.values())
        nodes = tuple(sorted(set(posted.nodes.values())))
        in_sync = (len(set(digests)) == 1 and len(digests) == context.options.workers
                   if context.options.workers > 1 else None)  # fmt: skip
        scored = method.build_trainable(keras, context)
        set_named_weights(scored, trained)
        return finish_job(context, method, checkpoint, scored, weights, started,
                          workers_in_sync=in_sync, nodes=nodes)  # fmt: skip


def run_job_here(
    context: JobContext, board: Any, weights_cache: dict | None = None, retry: bool = False
) -> JobResult:
    """Train, score and save one job in this process (a worker of the run's pool), from its
    last checkpoint in the runs folder if it has one; raises on failure. ``retry``: a worker
    that ran it before died, so wait for that worker's lease to lapse rather than refuse."""
    started = time.perf_counter()
    method = get_method(context.method)
    checkpoints = context.runs.checkpoints(context.dataset, context.method)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    with _lease(context, wait=retry) as lease:
        files = context.runs.job(context.dataset, context.method)
        if retry and files.exists():  # the worker that died had finished it
            return JobResult.from_artifacts(files, "done")
        weights = backbone_weights(context, method, weights_cache)
        saved = checkpoints.latest()
        restored = Checkpoint.from_files(saved) if saved else None
        initial = method.initial_weights(context, weights) if restored is None else None

        def save(epoch: int, logs: dict[str, float], checkpoint: Checkpoint) -> None:
            if checkpoint.state.final is not None:  # the last epoch's is written; artifacts next
                return
            lease.check()  # a worker that lost its lease stops before it writes
            checkpoints.save(epoch, checkpoint.to_files())
            board.post_epoch.remote(context.key, epoch)

        done = train_model(context, method, initial=initial, restored=restored, save=save)
        lease.check()
        checkpoint = done.checkpoint
        if context.options.keep_best and checkpoint.best_weights is not None:
            set_named_weights(done.model, checkpoint.best_weights)
        result = finish_job(context, method, checkpoint, done.model, weights, started,
                            workers_in_sync=None, nodes=(node,) if node else ())  # fmt: skip
        checkpoints.remove()
    return result


def finish_job(
    context: JobContext, method: Method, checkpoint: Checkpoint, scored: Any,
    weights: dict[str, ResolvedWeights], started: float, workers_in_sync: bool | None,
    nodes: tuple[str, ...],
) -> JobResult:  # fmt: skip
    """Score the trained model (``scored``: the trainable part with the weights kept), write
    every artifact, and say what was done."""
    files = context.runs.job(context.dataset, context.method)
    kept_best = context.options.keep_best and checkpoint.best_weights is not None
    trained = checkpoint.best_weights if kept_best else checkpoint.weights
    metrics = JobMetrics(context.dataset, context.method)
    metrics.update(**validation_metrics(context, method, scored))
    state = checkpoint.state
    history = state.history
    seconds = history.get("seconds") or []
    final = state.final
    if final is None:
        raise RuntimeError(f"{context.key}: its last checkpoint has no final counts")
    metrics.update(
        epochs=state.epoch,
        best_epoch=state.best_epoch,
        best_val_loss=state.best_val_loss,
        kept="best" if kept_best else "last",
        rows_per_epoch=final.rows_per_epoch,
        steps_per_epoch=final.steps_per_epoch,
        optimizer_steps=final.optimizer_steps,
        resumed_from_epoch=final.resumed_from,
        epoch_copies=context.options.epoch_copies,
        workers=context.options.workers,
        workers_in_sync=workers_in_sync,
        nodes=list(nodes),
        seconds=round(time.perf_counter() - started, 3),
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        seconds_per_epoch=round(float(np.mean(seconds)), 4) if seconds else None,
        manifest_ids={s.backbone: s.manifest_id for s in context.stores},
        store_ids={s.backbone: s.labelled_id for s in context.stores},
    )
    if context.cv is not None:
        metrics.update(**context.cv.metrics())
    abstention, bank = abstention_for(context, method, scored)
    metrics.abstain = abstention.to_json() if abstention else None
    _write_artifacts(context, method, trained, weights, metrics, history, bank)
    metrics.seconds = round(time.perf_counter() - started, 3)
    return JobResult.from_metrics(files, metrics, "done")


def _write_artifacts(
    context: JobContext, method: Method, trained: dict[str, list[np.ndarray]],
    weights: dict[str, ResolvedWeights], metrics: JobMetrics, history: dict[str, list[float]],
    bank: np.ndarray | None = None,
) -> None:  # fmt: skip
    files = context.runs.job(context.dataset, context.method)
    model = method.complete_model(context, calibrated(context, method, trained), weights)
    metrics.input_size = [int(d) for d in model.input_shape[1:3]]  # what `wf serve` decodes to
    model_name = files.write_model(model)
    files.write_weights(Artifact.TRAINED_WEIGHTS, trained)
    files.write_metrics(metrics)
    files.write_json(Artifact.CLASSES, list(context.classes))
    files.write_json(Artifact.SETTINGS, job_settings(context))
    files.write_history(history)
    title = f"{context.dataset} / {context.method}"
    files.write(Artifact.LEARNING_CURVES, plot_learning_curves(history, title))
    names = [model_name, Artifact.TRAINED_WEIGHTS, Artifact.METRICS, Artifact.CLASSES,
             Artifact.SETTINGS, Artifact.HISTORY, Artifact.LEARNING_CURVES]  # fmt: skip
    if metrics.confusion_matrix:
        files.write(Artifact.CONFUSION_MATRIX, plot_confusion_matrix(metrics.to_json(), title))
        names.append(Artifact.CONFUSION_MATRIX)
    if bank is not None:
        files.write(Artifact.EMBEDDINGS, bank_bytes(bank))
        names.append(Artifact.EMBEDDINGS)
    if context.cv is not None:
        files.write(Artifact.RELIABILITY, plot_reliability(context.cv.reliability, title))
        names.append(Artifact.RELIABILITY)
        if context.cv.learning_curve:
            curve = plot_learning_curve(list(context.cv.learning_curve), title)
            files.write(Artifact.LABELS_CURVE, curve)
            names.append(Artifact.LABELS_CURVE)
    for name, data in tensorboard_events(history).items():
        files.write(f"{Artifact.TENSORBOARD}/{name}", data)
        names.append(f"{Artifact.TENSORBOARD}/{name}")
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


@dataclass
class JobPosts:
    """What a job's workers posted on the :class:`JobBoard`."""

    epoch: int = 0  # epochs done (its progress bar)
    digests: dict[int, str] = dataclasses.field(default_factory=dict)  # by rank: trained weights
    nodes: dict[int, str] = dataclasses.field(default_factory=dict)  # by rank: the node it ran on


@ray.remote(num_cpus=0)
class JobBoard:
    """Per-job values that workers post (epochs done, weight digests, nodes) for the driver,
    by job key."""

    def __init__(self) -> None:
        self._posts: dict[str, JobPosts] = {}

    def post_epoch(self, job: str, epoch: int) -> None:
        self._posts.setdefault(job, JobPosts()).epoch = epoch

    def post_worker(self, job: str, rank: int, digest: str, node: str) -> None:
        """A worker of a job trained in sync is done: its weights' digest and its node."""
        posts = self._posts.setdefault(job, JobPosts())
        posts.digests[rank], posts.nodes[rank] = digest, node

    def get(self, job: str) -> JobPosts:
        return self._posts.get(job, JobPosts())

    def all(self) -> dict[str, JobPosts]:
        return dict(self._posts)


run_job_task = ray.remote(num_cpus=0, max_retries=0)(run_job)
