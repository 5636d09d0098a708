"""Training one job's model, on one worker or in sync on several: read its rows, build the
method's model, restore its last checkpoint, fit with a checkpoint every epoch.

:func:`train_model` is the loop, in the shape of Ray Train's TensorFlow MNIST example
(strategy, model, compile, fit with callbacks). Two callers: a long-lived worker of the run's
pool (:mod:`tasks.training.engine`, one worker per job, checkpoints in the runs folder), and
:func:`train_loop_per_worker`, Ray Train's entry point for a job on several workers that train
one model in sync under ``MultiWorkerMirroredStrategy``.

Training runs in tf-keras (the Keras 2 code base), whose ``model.fit`` supports that strategy;
Keras 3 does not fully (ray-project/ray#47464). The job runner then copies the trained weights
by layer name into the same architecture built in Keras 3.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from storage.runs import (
    CheckpointState,
    FinalCounts,
    named_weights_from_bytes,
    named_weights_to_bytes,
)
from tasks.heads import loss_name
from tasks.methods import JobContext, Method, get_method
from tasks.training.inputs import plan_epoch, read_rows, training_dataset, validation_dataset
from tasks.training.weights import (
    named_weights,
    optimizer_state,
    restore_optimizer_state,
    set_named_weights,
    weights_digest,
)


@dataclass
class Checkpoint:
    """What a job's checkpoint holds: weights, optimiser state, the callbacks' state."""

    weights: dict[str, list[np.ndarray]]
    state: CheckpointState = field(default_factory=CheckpointState)
    optimizer: list[np.ndarray] | None = None
    best_weights: dict[str, list[np.ndarray]] | None = None

    def to_files(self) -> dict[str, bytes]:
        optimizer = {"optimizer": self.optimizer} if self.optimizer else None
        arrays = {"weights.npz": self.weights, "best.npz": self.best_weights,
                  "optimizer.npz": optimizer}  # fmt: skip
        files = {n: named_weights_to_bytes(w) for n, w in arrays.items() if w is not None}
        files["state.json"] = self.state.to_bytes()
        return files

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> Checkpoint:
        def read(name: str) -> dict[str, list[np.ndarray]] | None:
            return named_weights_from_bytes(files[name]) if name in files else None

        optimizer = read("optimizer.npz")
        return cls(read("weights.npz") or {}, CheckpointState.from_bytes(files["state.json"]),
                   optimizer and optimizer["optimizer"], read("best.npz"))  # fmt: skip

    def save(self, folder: str) -> None:
        for name, data in self.to_files().items():
            with open(os.path.join(folder, name), "wb") as handle:
                handle.write(data)

    @classmethod
    def load(cls, folder: str) -> Checkpoint:
        files = {}
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), "rb") as handle:
                files[name] = handle.read()
        return cls.from_files(files)


def set_threads(threads: int) -> None:
    """The job's CPUs run its ops (inter) and the work inside each op (intra): with 2 threads
    the fine-tune's step is 1.2x faster than with one inter-op thread (benchmarks/). Once per
    process, before TensorFlow runs anything."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


@dataclass
class Trained:
    """A trained job: its tf-keras model (last epoch's weights) and the checkpoint of its end."""

    model: Any
    checkpoint: Checkpoint


Save = Callable[[int, dict[str, float], Checkpoint], None]


def train_model(
    context: JobContext, method: Method, *, initial: dict[str, list[np.ndarray]] | None,
    restored: Checkpoint | None, save: Save, rank: int = 0, world: int = 1, strategy: Any = None,
) -> Trained:  # fmt: skip
    """Fit the job's model from ``restored`` (or the start) to its last epoch; ``save`` gets
    every epoch's checkpoint, and the final one (``state.final``) once more at the end."""
    import tensorflow as tf
    import tf_keras

    from tasks.training.callbacks import (
        BestEpoch,
        EpochLog,
        ReportEveryEpoch,
        StopWithoutProgress,
    )

    recipe, options = context.recipe, context.options
    strategy = strategy or tf.distribute.get_strategy()
    train = read_rows(context, method, "train", rank, world)
    val = (read_rows(context, method, "validation", rank, world, first_copy_only=True)
           if context.has_split("validation") else None)  # fmt: skip
    state = restored.state if restored else CheckpointState()

    tf_keras.utils.set_random_seed(options.seed)  # the same initial weights on every worker
    with strategy.scope():
        model = method.build_trainable(tf_keras, context)
        if initial is not None:
            set_named_weights(model, initial)
        model.compile(recipe.optimizer_for(tf_keras), loss_name(len(context.classes)), ["accuracy"])
        if restored is not None:
            set_named_weights(model, restored.weights)
            if restored.optimizer is not None:
                restore_optimizer_state(model, restored.optimizer)

    log = EpochLog(**state.log)
    best = BestEpoch(options.keep_best, **state.best,
                     weights=restored.best_weights if restored else None)  # fmt: skip
    callbacks: list[Any] = [log, best]
    stop = None
    if options.early_stopping_patience is not None:
        stop = StopWithoutProgress(options.early_stopping_patience, **(state.stop or {}))
        callbacks.append(stop)

    def checkpoint(final: FinalCounts | None = None) -> Checkpoint:
        states = CheckpointState(log.state(), best.state(), stop.state() if stop else None, final)
        return Checkpoint(named_weights(model), states,
                          [v.numpy() for v in optimizer_state(model.optimizer)],
                          best.weights if options.keep_best else None)  # fmt: skip

    plan = plan_epoch(context, method, world)
    resumed_from = log.epoch
    if method.closed_form:  # set in one step from every worker's rows: no epochs to run
        every = read_rows(context, method, "train", first_copy_only=True)
        set_named_weights(model, method.fit_closed_form(every.x, every.y, len(context.classes)))
    elif log.epoch < recipe.epochs and not (stop and stop.done):
        validation, validation_steps = (validation_dataset(val, recipe.batch_size, world)
                                        if val is not None else (None, None))  # fmt: skip
        model.fit(
            training_dataset(context, method, train, plan, world, rank, log.epoch),
            epochs=recipe.epochs,
            initial_epoch=log.epoch,
            steps_per_epoch=plan.steps,
            validation_data=validation,
            validation_steps=validation_steps,
            callbacks=[*callbacks, ReportEveryEpoch(lambda e, logs: save(e, logs, checkpoint()))],
            verbose=0,
        )
    final = FinalCounts(resumed_from=resumed_from, rows_per_epoch=plan.rows * world,
                        steps_per_epoch=plan.steps,
                        optimizer_steps=int(model.optimizer.iterations.numpy()))  # fmt: skip
    end = checkpoint(final)
    save(log.epoch, {}, end)  # its state's final counts say it is the last
    return Trained(model, end)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on each worker of a job trained in sync on several."""
    import tensorflow as tf

    context: JobContext = config["context"]
    set_threads(context.options.threads)
    train_context = ray.train.get_context()
    world, rank = train_context.get_world_size(), train_context.get_world_rank()
    strategy = (
        tf.distribute.MultiWorkerMirroredStrategy() if world > 1 else tf.distribute.get_strategy()
    )
    restored = None
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder:
            restored = Checkpoint.load(folder)
    board = config["board"]

    def save(epoch: int, logs: dict[str, float], checkpoint: Checkpoint) -> None:
        with tempfile.TemporaryDirectory() as folder:
            checkpoint.save(folder)
            ray.train.report(
                {"epoch": epoch, **logs},
                checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None,
            )
        if rank == 0:
            board.post_epoch.remote(context.key, epoch)

    initial = config.get("initial_weights")
    trained = train_model(
        context, get_method(context.method), restored=restored, save=save, rank=rank,
        world=world, strategy=strategy, initial=ray.get(initial) if initial is not None else None,
    )  # fmt: skip
    digest = weights_digest(named_weights(trained.model))
    node = ray.get_runtime_context().get_node_id()
    ray.get(board.post_worker.remote(context.key, rank, digest, node))
