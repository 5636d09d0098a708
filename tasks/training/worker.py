"""One Ray Train worker of one job: read its rows, build the method's model, fit, checkpoint
every epoch. Several workers train one model in sync under ``MultiWorkerMirroredStrategy``.

Training runs in tf-keras (the Keras 2 code base), whose ``model.fit`` supports that strategy;
Keras 3 does not fully (ray-project/ray#47464). The job runner then copies the trained weights
by layer name into the same architecture built in Keras 3.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from storage.runs import named_weights_from_bytes, named_weights_to_bytes
from tasks.heads import loss_name
from tasks.methods import JobContext, get_method
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
    """What a job's checkpoint folder holds: weights, optimiser state, the callbacks' state."""

    weights: dict[str, list[np.ndarray]]
    state: dict[str, Any] = field(default_factory=dict)
    optimizer: list[np.ndarray] | None = None
    best_weights: dict[str, list[np.ndarray]] | None = None

    def save(self, folder: str) -> None:
        optimizer = {"optimizer": self.optimizer} if self.optimizer else None
        files = {
            "weights.npz": self.weights,
            "best.npz": self.best_weights,
            "optimizer.npz": optimizer,
        }
        for name, weights in files.items():
            if weights is not None:
                with open(os.path.join(folder, name), "wb") as handle:
                    handle.write(named_weights_to_bytes(weights))
        with open(os.path.join(folder, "state.json"), "w") as handle:
            json.dump(self.state, handle)

    @classmethod
    def load(cls, folder: str) -> Checkpoint:
        def read(name: str) -> dict[str, list[np.ndarray]] | None:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                return None
            with open(path, "rb") as handle:
                return named_weights_from_bytes(handle.read())

        with open(os.path.join(folder, "state.json")) as handle:
            state = json.load(handle)
        optimizer = read("optimizer.npz")
        return cls(read("weights.npz") or {}, state, optimizer and optimizer["optimizer"],
                   read("best.npz"))  # fmt: skip


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on each worker (see the module docstring)."""
    import tensorflow as tf

    context: JobContext = config["context"]
    method, recipe, options = get_method(context.method), context.recipe, context.options
    # The job's CPUs run its ops (inter) and the work inside each op (intra): with 2 threads
    # the fine-tune's step is 1.2x faster than with one inter-op thread (benchmarks/).
    tf.config.threading.set_intra_op_parallelism_threads(options.threads)
    tf.config.threading.set_inter_op_parallelism_threads(options.threads)
    import tf_keras

    from tasks.training.callbacks import BestEpoch, EpochLog, ReportEveryEpoch, StopWithoutProgress

    train_context = ray.train.get_context()
    world, rank = train_context.get_world_size(), train_context.get_world_rank()
    strategy = (
        tf.distribute.MultiWorkerMirroredStrategy() if world > 1 else tf.distribute.get_strategy()
    )
    train = read_rows(context, method, "train", rank, world)
    val = (read_rows(context, method, "validation", rank, world, first_copy_only=True)
           if context.has_split("validation") else None)  # fmt: skip
    checkpoint = ray.train.get_checkpoint()
    restored = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            restored = Checkpoint.load(folder)
    state = restored.state if restored else {}

    tf_keras.utils.set_random_seed(options.seed)  # the same initial weights on every worker
    with strategy.scope():
        model = method.build_trainable(tf_keras, context)
        if config.get("initial_weights") is not None:
            set_named_weights(model, ray.get(config["initial_weights"]))
        model.compile(recipe.optimizer_for(tf_keras), loss_name(len(context.classes)), ["accuracy"])
        if restored is not None:
            set_named_weights(model, restored.weights)
            if restored.optimizer is not None:
                restore_optimizer_state(model, restored.optimizer)

    log = EpochLog(**state.get("log", {}))
    best = BestEpoch(options.keep_best, **state.get("best", {}),
                     weights=restored.best_weights if restored else None)  # fmt: skip
    callbacks: list[Any] = [log, best]
    stop = None
    if options.early_stopping_patience is not None:
        stop = StopWithoutProgress(options.early_stopping_patience, **state.get("stop", {}))
        callbacks.append(stop)

    def states() -> dict[str, Any]:
        return {
            "log": log.state(),
            "best": best.state(),
            **({"stop": stop.state()} if stop else {}),
        }

    def report(epoch: int, logs: dict[str, float], final: dict[str, Any] | None = None) -> None:
        with tempfile.TemporaryDirectory() as folder:
            Checkpoint(
                named_weights(model), {**states(), **(final or {})},
                [v.numpy() for v in optimizer_state(model.optimizer)],
                best.weights if options.keep_best else None,
            ).save(folder)  # fmt: skip
            ray.train.report(
                {"epoch": epoch, **logs},
                checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None,
            )
        if rank == 0:
            config["board"].set.remote(context.key, "epoch", epoch)

    plan = plan_epoch(context, method, world)
    resumed_from = log.epoch
    if log.epoch < recipe.epochs and not (stop and stop.done):
        validation, validation_steps = (validation_dataset(val, recipe.batch_size, world)
                                        if val is not None else (None, None))  # fmt: skip
        model.fit(
            training_dataset(context, method, train, plan, world, rank, log.epoch),
            epochs=recipe.epochs,
            initial_epoch=log.epoch,
            steps_per_epoch=plan.steps,
            validation_data=validation,
            validation_steps=validation_steps,
            callbacks=[*callbacks, ReportEveryEpoch(report)],
            verbose=0,
        )
    board = config["board"]
    board.set.remote(context.key, f"digest/{rank}", weights_digest(named_weights(model)))
    board.set.remote(context.key, f"node/{rank}", ray.get_runtime_context().get_node_id())
    final = {
        "resumed_from": resumed_from,
        "rows_per_epoch": plan.rows * world,
        "steps_per_epoch": plan.steps,
        "optimizer_steps": int(model.optimizer.iterations.numpy()),
    }
    report(log.epoch, {"final": 1.0}, {"final": final})
