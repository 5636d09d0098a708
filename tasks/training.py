"""Training one (dataset, method) job on Ray Train workers, and turning it into artifacts.

:func:`train_loop_per_worker` runs on each Ray Train worker: it reads its shard of the feature
store through Ray Data, builds the model in tf-keras under ``MultiWorkerMirroredStrategy``
when there are several workers (so they train one model in sync), and reports a checkpoint
every epoch. :func:`run_job` is the job's driver: it starts the ``TensorflowTrainer``, then
builds the complete Keras 3 model (images in, class probabilities out), evaluates it and writes
the artifacts. Both are plain functions; :data:`run_job_task` is the thin ``ray.remote`` wrapper.

The three methods, as in the Keras blog:

- ``bottleneck``: a small dense top on the stored ``bottleneck`` tap of every stored copy;
- ``finetune``: the backbone's last block, initialised from the backbone, with the trained
  bottleneck top on it, trained at a low learning rate (SGD 1e-4, momentum 0.9) on the stored
  ``last_block_input`` tap, so the frozen layers never run again; BatchNorm stays in inference
  mode;
- ``scratch``: the small convnet trained from the images with real-time augmentation.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import ray

from storage.artifacts import (
    JobFiles,
    load_named_weights,
    ray_storage_dir,
    save_named_weights,
    write_bytes,
    write_history_csv,
    write_json,
)
from storage.feature_store import FeatureStore, tap_column
from tasks.augment import AugmentPolicy, augment_image
from tasks.backbones import (
    ResolvedWeights,
    build_model,
    build_tail,
    get_backbone,
)
from tasks.evaluation import classification_metrics, plot_confusion_matrix, plot_learning_curves
from tasks.heads import build_scratch, build_top, loss_name, probabilities
from tasks.images import ImageRejected, decode_image

TAP_OF_METHOD = {"bottleneck": "bottleneck", "finetune": "last_block_input", "scratch": None}


@dataclass(frozen=True)
class JobSpec:
    """Everything one training job needs; built by the workflow, passed to the workers."""

    dataset: str
    method: str
    store: str
    runs: str
    backbone: str
    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    momentum: float = 0.0
    workers: int = 1
    threads: int = 1
    use_gpu: bool = False
    early_stopping_patience: int | None = None
    keep_best: bool = False
    epoch_copies: str = "all"  # or "one": each training image once per epoch, copies in turn
    seed: int = 0
    scratch_image_size: int = 150
    policy: AugmentPolicy = field(default_factory=AugmentPolicy)
    max_failures: int = 0

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.method}"

    @property
    def run_name(self) -> str:
        return f"{self.dataset}-{self.method}"


@dataclass(frozen=True)
class JobResult:
    dataset: str
    method: str
    status: str  # "done", "failed" or "skipped"
    accuracy: float | None = None
    loss: float | None = None
    epochs: int = 0
    resumed_from_epoch: int = 0
    seconds: float = 0.0
    seconds_per_epoch: float | None = None
    workers_in_sync: bool | None = None
    error: str = ""
    model_path: str = ""


# ---------------------------------------------------------------- on the workers


def _stack(column: np.ndarray, shape: tuple[int, ...], dtype: str = "float32") -> np.ndarray:
    if column.dtype == object:
        column = np.stack(column)
    return column.reshape((len(column), *shape)).astype(dtype, copy=False)


def decode_files(
    root: str, paths: Any, size: tuple[int, int], black_on_error: bool = False
) -> np.ndarray:
    """The images at ``paths`` (relative to ``root``), decoded and resized: ``(n, *size, 3)``
    uint8. A file that fails raises, or becomes a black image with ``black_on_error``."""
    images = [np.zeros((0, *size, 3), np.uint8)]
    for path in paths:
        try:
            with open(os.path.join(root, path), "rb") as handle:
                images.append(decode_image(handle.read(), size)[None])
        except (OSError, ImageRejected):
            if not black_on_error:
                raise
            images.append(np.zeros((1, *size, 3), np.uint8))
    return np.concatenate(images)


def load_shard(
    shard: Any, spec: JobSpec, context: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This worker's rows as ``(inputs, labels, copies)``: stored taps, or decoded images for
    scratch (whose rows are all copy 0)."""
    inputs, labels, copies = [], [], []
    for batch in shard.iter_batches(batch_size=1024, batch_format="numpy"):
        labels.append(batch["label_index"].astype(np.int64))
        copies.append(batch["copy"].astype(np.int64))
        if spec.method == "scratch":
            size = (spec.scratch_image_size, spec.scratch_image_size)
            inputs.append(decode_files(context["dataset_root"], batch["path"], size))
        else:
            tap = TAP_OF_METHOD[spec.method]
            inputs.append(_stack(batch[tap_column(tap)], tuple(context["tap_shape"])))
    if not labels:
        raise RuntimeError(f"worker got no rows of {spec.key}")
    return np.concatenate(inputs), np.concatenate(labels), np.concatenate(copies)


def one_copy_per_epoch(
    x: np.ndarray,
    y: np.ndarray,
    copies: np.ndarray,
    first_epoch: int,
    rows_per_epoch: int,
    seed: int,
) -> Any:
    """Rows for ``epoch_copies="one"``, one epoch after another from ``first_epoch`` on: epoch
    ``e`` reads ``rows_per_epoch`` rows of copy ``e mod n`` (n stored copies per image), freshly
    shuffled, so each epoch shows each image once, as the blog's real-time augmentation does
    (rounding ``rows_per_epoch`` up to whole batches wraps around within the copy). All in
    tf.data: no Python per batch."""
    import tensorflow as tf

    kinds = np.unique(copies)
    streams = [
        tf.data.Dataset.from_tensor_slices((x[copies == c], y[copies == c]))
        .shuffle(int((copies == c).sum()), seed=seed + int(c), reshuffle_each_iteration=True)
        .repeat()
        for c in kinds
    ]
    choice = tf.data.Dataset.range(first_epoch, 2**62).flat_map(
        lambda epoch: tf.data.Dataset.from_tensors(epoch % len(kinds)).repeat(rows_per_epoch)
    )
    return tf.data.Dataset.choose_from_datasets(streams, choice, stop_on_empty_dataset=False)


def build_trainable(keras_module: Any, spec: JobSpec, context: dict[str, Any]) -> Any:
    """The model a job trains: top, last block + top, or the small convnet."""
    classes = len(context["classes"])
    if spec.method == "scratch":
        return build_scratch(keras_module, spec.scratch_image_size, classes)
    if spec.method == "bottleneck":
        return build_top(keras_module, tuple(context["tap_shape"]), classes)
    backbone = get_backbone(spec.backbone)
    tail = build_tail(keras_module, backbone, tuple(context["tap_shape"]))
    for layer in tail.layers:  # BatchNorm in inference mode, its statistics frozen
        if isinstance(layer, keras_module.layers.BatchNormalization):
            layer.trainable = False
    top = build_top(keras_module, tuple(int(d) for d in tail.output.shape[1:]), classes)
    return keras_module.Model(tail.input, top(tail.output), name="finetune")


def named_weights(model: Any) -> dict[str, list[np.ndarray]]:
    """Every weighted layer's weights by name, nested models flattened."""
    out: dict[str, list[np.ndarray]] = {}
    for layer in model.layers:
        if hasattr(layer, "layers"):
            out.update(named_weights(layer))
        elif layer.weights:
            out[layer.name] = [np.asarray(w) for w in layer.get_weights()]
    return out


def set_named_weights(model: Any, weights: dict[str, list[np.ndarray]]) -> int:
    copied = 0
    for layer in model.layers:
        if hasattr(layer, "layers"):
            copied += set_named_weights(layer, weights)
        elif layer.weights and layer.name in weights:
            layer.set_weights(weights[layer.name])
            copied += 1
    return copied


def optimizer_state(optimizer: Any) -> list[Any]:
    """The optimiser's variables (step count, then momentum or moving averages), in order."""
    variables = optimizer.variables
    return list(variables() if callable(variables) else variables)


def restore_optimizer_state(model: Any, values: list[np.ndarray]) -> None:
    """Build ``model``'s optimiser and give it ``values`` (saved by :func:`optimizer_state`);
    call inside the strategy's scope."""
    model.optimizer.build(model.trainable_variables)
    variables = optimizer_state(model.optimizer)
    shapes = [tuple(v.shape) for v in variables]
    if shapes != [tuple(v.shape) for v in values]:
        raise ValueError(f"checkpointed optimiser state does not fit this model: {shapes}")
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)


def weights_digest(weights: dict[str, list[np.ndarray]]) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        for array in weights[name]:
            digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()


def _optimizer(keras_module: Any, spec: JobSpec) -> Any:
    if spec.optimizer == "sgd":
        return keras_module.optimizers.SGD(spec.learning_rate, momentum=spec.momentum)
    if spec.optimizer == "adam":
        return keras_module.optimizers.Adam(spec.learning_rate)
    return keras_module.optimizers.RMSprop(spec.learning_rate)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of one job (see the module docstring)."""
    import tensorflow as tf

    spec: JobSpec = config["spec"]
    context: dict[str, Any] = config["context"]
    board = config["board"]
    # The job's CPUs run its ops (inter) and the work inside each op (intra): with 2 threads,
    # the fine-tune's train step is 1.2x faster than with one inter-op thread (benchmarks/).
    tf.config.threading.set_intra_op_parallelism_threads(spec.threads)
    tf.config.threading.set_inter_op_parallelism_threads(spec.threads)
    import tf_keras

    train_context = ray.train.get_context()
    world, rank = train_context.get_world_size(), train_context.get_world_rank()
    strategy = (
        tf.distribute.MultiWorkerMirroredStrategy() if world > 1 else tf.distribute.get_strategy()
    )
    x_train, y_train, copies = load_shard(ray.train.get_dataset_shard("train"), spec, context)
    validation = ray.train.get_dataset_shard("validation") if context["has_validation"] else None
    x_val, y_val = load_shard(validation, spec, context)[:2] if validation else (None, None)
    tf_keras.utils.set_random_seed(spec.seed)  # same initial weights on every worker
    with strategy.scope():
        model = build_trainable(tf_keras, spec, context)
        if config.get("initial_weights") is not None:
            set_named_weights(model, ray.get(config["initial_weights"]))
        model.compile(
            optimizer=_optimizer(tf_keras, spec),
            loss=loss_name(len(context["classes"])),
            metrics=["accuracy"],
        )

    state = {"epoch": 0, "history": {}, "best_val_loss": None, "best_epoch": None, "waited": 0}
    best_weights = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            with open(os.path.join(folder, "state.json")) as handle:
                state = json.load(handle)
            set_named_weights(model, load_named_weights(os.path.join(folder, "weights.npz")))
            if os.path.exists(os.path.join(folder, "optimizer.npz")):  # not in the final one
                saved = load_named_weights(os.path.join(folder, "optimizer.npz"))
                with strategy.scope():
                    restore_optimizer_state(model, saved["optimizer"])
            if os.path.exists(os.path.join(folder, "best.npz")):
                best_weights = load_named_weights(os.path.join(folder, "best.npz"))
    resumed_from = state["epoch"]

    per_worker_batch = spec.batch_size
    global_batch = per_worker_batch * world
    rows_per_epoch = len(x_train)
    one_copy = spec.epoch_copies == "one" and spec.method != "scratch"  # scratch augments live
    if one_copy:  # every worker has as many rows (Ray Train splits equally): as many steps
        rows_per_epoch = -(-len(x_train) // context["copies"])
    steps = max(1, -(-rows_per_epoch // per_worker_batch))
    rng = np.random.default_rng([spec.seed, rank, resumed_from])

    def augment_batch(images: np.ndarray) -> np.ndarray:
        seeds = rng.integers(0, 2**63 - 1, size=len(images))
        return np.stack(
            [augment_image(i, spec.policy, int(s)) for i, s in zip(images, seeds, strict=True)]
        )

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    if one_copy:
        # Each step takes one batch of global_batch rows, so an epoch is steps of them.
        train_ds = one_copy_per_epoch(
            x_train, y_train, copies, resumed_from, steps * global_batch, spec.seed + rank
        ).batch(global_batch)
    else:
        train_ds = (
            tf.data.Dataset.from_tensor_slices((x_train, y_train))
            .shuffle(len(x_train), seed=spec.seed + rank, reshuffle_each_iteration=True)
            .repeat()
        )
        if spec.method == "scratch":
            train_ds = (
                train_ds.batch(per_worker_batch)
                .map(lambda x, y: (tf.numpy_function(augment_batch, [x], tf.uint8), y))
                .unbatch()
            )
        train_ds = train_ds.batch(global_batch)
    train_ds = train_ds.with_options(options).prefetch(2)
    val_ds, val_steps = None, None
    if x_val is not None and len(x_val):
        val_ds = tf.data.Dataset.from_tensor_slices((x_val, y_val))
        if world > 1:  # every worker must run the same number of steps: wrap around
            val_steps = max(1, -(-len(x_val) // per_worker_batch))
            val_ds = val_ds.repeat()
        val_ds = val_ds.batch(global_batch).with_options(options)

    class ReportEveryEpoch(tf_keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            nonlocal best_weights
            logs = {k: float(v) for k, v in (logs or {}).items()}
            logs["seconds"] = time.perf_counter() - self.started
            for key, value in logs.items():
                state["history"].setdefault(key, []).append(value)
            state["epoch"] = epoch + 1
            val_loss = logs.get("val_loss")
            if val_loss is not None and (
                state["best_val_loss"] is None or val_loss < state["best_val_loss"]
            ):
                state.update(best_val_loss=val_loss, best_epoch=epoch + 1, waited=0)
                best_weights = named_weights(self.model) if spec.keep_best else None
            else:
                state["waited"] += 1
            patience = spec.early_stopping_patience
            if patience is not None and val_loss is not None and state["waited"] >= patience:
                self.model.stop_training = True
            with tempfile.TemporaryDirectory() as folder:
                save_named_weights(os.path.join(folder, "weights.npz"), named_weights(self.model))
                save_named_weights(
                    os.path.join(folder, "optimizer.npz"),
                    {"optimizer": [v.numpy() for v in optimizer_state(self.model.optimizer)]},
                )
                if best_weights is not None:
                    save_named_weights(os.path.join(folder, "best.npz"), best_weights)
                write_json(os.path.join(folder, "state.json"), state)
                ray.train.report(
                    {"epoch": epoch + 1, **logs},
                    checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None,
                )
            if rank == 0:
                board.set.remote(spec.key, "epoch", epoch + 1)

    done = state["epoch"] >= spec.epochs or (
        spec.early_stopping_patience is not None and state["waited"] >= spec.early_stopping_patience
    )
    if not done:
        model.fit(
            train_ds,
            epochs=spec.epochs,
            initial_epoch=state["epoch"],
            steps_per_epoch=steps,
            validation_data=val_ds,
            validation_steps=val_steps,
            callbacks=[ReportEveryEpoch()],
            verbose=0,
        )
    final = best_weights if (spec.keep_best and best_weights is not None) else named_weights(model)
    board.set.remote(spec.key, f"digest/{rank}", weights_digest(named_weights(model)))
    with tempfile.TemporaryDirectory() as folder:
        save_named_weights(os.path.join(folder, "final.npz"), final)
        write_json(
            os.path.join(folder, "state.json"),
            {
                **state,
                "final": True,
                "resumed_from": resumed_from,
                "rows_per_epoch": rows_per_epoch * world,
                "optimizer_steps": int(model.optimizer.iterations.numpy()),
                "steps_per_epoch": steps,
            },
        )
        save_named_weights(os.path.join(folder, "weights.npz"), named_weights(model))
        ray.train.report(
            {"final": 1, "epoch": state["epoch"]},
            checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None,
        )


# ---------------------------------------------------------------- the job's driver


def complete_model(
    spec: JobSpec,
    context: dict[str, Any],
    trained: dict[str, list[np.ndarray]],
    weights: ResolvedWeights | None,
) -> Any:
    """The Keras 3 model users get: RGB pixels in [0, 255] in, class probabilities out."""
    import keras

    trainable = build_trainable(keras, spec, context)
    set_named_weights(trainable, trained)
    if spec.method == "scratch":
        return trainable
    backbone = get_backbone(spec.backbone)
    base = build_model(backbone, tuple(context["input_size"]), weights)
    if spec.method == "finetune":
        copied = set_named_weights(base, trained)
        assert copied, "no fine-tuned layer matched the backbone"
    top = trainable if spec.method == "bottleneck" else trainable.get_layer("top")
    probabilities_out = top(base.output["bottleneck"])
    return keras.Model(base.input, probabilities_out, name=f"{spec.dataset}_{spec.method}")


def _validation_metrics(
    spec: JobSpec, context: dict[str, Any], trained: Any, store: FeatureStore
) -> dict:
    import keras

    classes = tuple(context["classes"])
    if not context["has_validation"]:
        return {}
    if spec.method == "scratch":
        table = store.read_table("validation", ["path", "label_index", "copy"])
        size = (spec.scratch_image_size, spec.scratch_image_size)
        x = decode_files(context["dataset_root"], table["path"].to_pylist(), size, True)
        y = table["label_index"].to_numpy()
    else:
        x, y = store.read_numpy("validation", TAP_OF_METHOD[spec.method], copies=False)
        x = x.astype(np.float32)
    model = build_trainable(keras, spec, context)
    set_named_weights(model, trained)
    outputs = model.predict(x, batch_size=64, verbose=0)
    return classification_metrics(y, probabilities(outputs, len(classes)), classes)


def job_context(spec: JobSpec) -> dict[str, Any]:
    store = FeatureStore.open(spec.store, spec.dataset, spec.backbone)
    manifest = store.manifest
    tap = TAP_OF_METHOD[spec.method]
    return {
        "classes": list(manifest.classes),
        "dataset_root": manifest.dataset_root,
        "input_size": list(manifest.input_size),
        "tap_shape": list(manifest.taps[tap].shape) if tap else None,
        "copies": manifest.augment_copies + 1,  # stored rows per training image
        "has_validation": bool(store.files("validation")),
        "manifest_id": manifest.manifest_id,
        "weights_source": manifest.weights_source,
        "weights_sha256": manifest.weights_sha256,
    }


def _datasets(spec: JobSpec, store: FeatureStore) -> dict[str, Any]:
    from ray.data.expressions import col

    tap = TAP_OF_METHOD[spec.method]
    columns = ["label_index", "copy", tap_column(tap) if tap else "path"]
    datasets = {}
    for split in ("train", "validation"):
        files = store.files(split)
        if not files:
            continue
        # Read before the trainer starts, with no CPU reserved: once training workers hold every
        # CPU of a small cluster, a read task that needs one would never run (a deadlock).
        dataset = ray.data.read_parquet(files, filesystem=store.layout.filesystem, num_cpus=0)
        dataset = dataset.select_columns(columns)
        if spec.method == "scratch":
            dataset = dataset.filter(expr=col("copy") == 0, num_cpus=0)
        datasets[split] = dataset.materialize()
    return datasets


def run_job(spec: JobSpec, board: Any, weights: ResolvedWeights | None) -> JobResult:
    """Train one job on Ray Train and write its artifacts; raises on failure."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    started = time.perf_counter()
    files = JobFiles(spec.runs, spec.dataset, spec.method)
    store = FeatureStore.open(spec.store, spec.dataset, spec.backbone)
    context = job_context(spec)
    initial = None
    if spec.method == "finetune":
        import keras

        top_path = JobFiles(spec.runs, spec.dataset, "bottleneck").weights
        if not os.path.exists(top_path):
            raise RuntimeError(f"finetune needs the bottleneck top of {spec.dataset}: {top_path}")
        base = build_model(get_backbone(spec.backbone), tuple(context["input_size"]), weights)
        tail = build_tail(keras, get_backbone(spec.backbone), tuple(context["tap_shape"]))
        set_named_weights(tail, named_weights(base))
        initial = ray.put({**named_weights(tail), **load_named_weights(top_path)})
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={
            "spec": spec,
            "context": context,
            "board": board,
            "initial_weights": initial,
        },
        scaling_config=ScalingConfig(
            num_workers=spec.workers,
            use_gpu=spec.use_gpu,
            resources_per_worker={"CPU": spec.threads},
        ),
        datasets=_datasets(spec, store),
        # Several workers each read their equal share (a streaming split); one worker reads
        # all rows, straight from the materialised dataset, without a split coordinator actor
        # (one process fewer to start per dataset and job).
        dataset_config=DataConfig(datasets_to_split="all" if spec.workers > 1 else []),
        run_config=RunConfig(
            name=spec.run_name,
            storage_path=ray_storage_dir(spec.runs),
            failure_config=FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        trained = load_named_weights(os.path.join(folder, "final.npz"))
        with open(os.path.join(folder, "state.json")) as handle:
            state = json.load(handle)
    digests = ray.get(board.get.remote(spec.key))
    in_sync = None
    if spec.workers > 1:
        values = {v for k, v in digests.items() if k.startswith("digest/")}
        in_sync = (
            len(values) == 1
            and len([k for k in digests if k.startswith("digest/")]) == spec.workers
        )

    model = complete_model(spec, context, trained, weights)
    os.makedirs(files.dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        model.save(os.path.join(folder, "model.keras"))
        with open(os.path.join(folder, "model.keras"), "rb") as handle:
            write_bytes(files.model, handle.read())
    save_named_weights(files.weights, trained)
    metrics = _validation_metrics(spec, context, trained, store)
    history = state["history"]
    seconds_per_epoch = history.get("seconds") or []
    seconds = time.perf_counter() - started
    metrics.update(
        dataset=spec.dataset,
        method=spec.method,
        epochs=state["epoch"],
        best_epoch=state.get("best_epoch"),
        best_val_loss=state.get("best_val_loss"),
        rows_per_epoch=state.get("rows_per_epoch"),
        steps_per_epoch=state.get("steps_per_epoch"),
        optimizer_steps=state.get("optimizer_steps"),
        epoch_copies=spec.epoch_copies,
        resumed_from_epoch=state.get("resumed_from", 0),
        workers=spec.workers,
        workers_in_sync=in_sync,
        seconds=round(seconds, 3),
        seconds_per_epoch=round(float(np.mean(seconds_per_epoch)), 4)
        if seconds_per_epoch
        else None,
        manifest_id=context["manifest_id"],
    )
    write_json(files.path("metrics.json"), metrics)
    write_json(files.path("classes.json"), context["classes"])
    write_json(files.path("settings.json"), {**asdict(spec), "context": context})
    write_history_csv(files.path("history.csv"), history)
    title = f"{spec.dataset} / {spec.method}"
    plot_learning_curves(history, files.path("learning_curves.png"), title)
    if metrics.get("confusion_matrix"):
        plot_confusion_matrix(metrics, files.path("confusion_matrix.png"), title)
    return JobResult(
        dataset=spec.dataset,
        method=spec.method,
        status="done",
        accuracy=metrics.get("accuracy"),
        loss=metrics.get("loss"),
        epochs=state["epoch"],
        resumed_from_epoch=state.get("resumed_from", 0),
        seconds=seconds,
        seconds_per_epoch=metrics["seconds_per_epoch"],
        workers_in_sync=in_sync,
        model_path=files.model,
    )


@ray.remote(num_cpus=0)
class JobBoard:
    """Per-job facts that workers post (epochs done, final weight digests) for the driver."""

    def __init__(self) -> None:
        self._facts: dict[str, dict[str, Any]] = {}

    def set(self, job: str, key: str, value: Any) -> None:
        self._facts.setdefault(job, {})[key] = value

    def get(self, job: str) -> dict[str, Any]:
        return dict(self._facts.get(job, {}))

    def all(self) -> dict[str, dict[str, Any]]:
        return {job: dict(facts) for job, facts in self._facts.items()}


run_job_task = ray.remote(num_cpus=0, max_retries=0)(run_job)
