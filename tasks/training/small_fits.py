"""Many small fits of one method on given rows, each at the cost of its arithmetic.

k-fold folds, learning-curve points, calibration and label-next rounds are all the same
question: train a method's model on some rows, predict others. :func:`out_of_sample_probabilities`
answers it for any number of (train rows, held-out rows) splits, on the run's
:class:`~tasks.training.engine.TrainingPool` (two fits at a time on two CPUs) or in this
process. Nothing is written: no runs folder, no checkpoints, no lease.

What makes a fit cost its arithmetic: a worker builds and compiles the model of one problem
once, keeps its initial weights, and for every fit puts them back, zeroes the optimiser's state
and calls ``fit`` again, which reuses the traced train step. The rows cross to the workers
once (Ray's object store), and each call to a worker carries a batch of splits.

    problem = FitProblem(x, y, num_classes=2)             # method "bottleneck", its recipe
    folds = np.arange(len(y)) % 5
    probabilities = out_of_fold_probabilities(problem, folds, pool)   # (rows, classes)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.methods import Recipe, get_method


@dataclass(frozen=True)
class FitProblem:
    """Rows to fit on: features ``x`` (``(rows, *shape)``, float32), integer labels ``y``,
    how many classes, the method (one with :meth:`~tasks.methods.Method.build_on_rows`), its
    recipe (default: the method's own) and the seed of its initial weights."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    method: str = "bottleneck"
    recipe: Recipe | None = None
    seed: int = 0
    key: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} rows and y {len(self.y)}")
        recipe = self.recipe or get_method(self.method).recipe
        object.__setattr__(self, "recipe", recipe)
        key = (self.method, tuple(self.x.shape[1:]), self.num_classes, recipe, self.seed)
        object.__setattr__(self, "key", key)


class _CompiledFit:
    """One problem's model, optimiser and whole-fit graph, built once per worker: every epoch
    and step of a fit run in one ``tf.function`` call (a ``while_loop`` over precomputed
    batches), so a fit costs its arithmetic and not a Python round trip per step. The same
    model, loss, optimiser, batch size, epochs and per-epoch shuffling as the method's
    ``model.fit`` in a job."""

    def __init__(self, problem: FitProblem) -> None:
        import tensorflow as tf
        import tf_keras

        from tasks.heads import loss_name
        from tasks.training.weights import optimizer_state

        recipe = problem.recipe
        assert recipe is not None
        tf_keras.utils.set_random_seed(problem.seed)
        self.model = get_method(problem.method).build_on_rows(
            tf_keras, tuple(problem.x.shape[1:]), problem.num_classes
        )
        self.initial = self.model.get_weights()
        self.optimizer = recipe.optimizer_for(tf_keras)
        self.optimizer.build(self.model.trainable_variables)
        self.state = optimizer_state(self.optimizer)
        self.batch, self.epochs, self.binary = (
            recipe.batch_size,
            recipe.epochs,
            problem.num_classes == 2,
        )
        loss = tf_keras.losses.get(loss_name(problem.num_classes))
        model, optimizer = self.model, self.optimizer

        rows = tf.TensorSpec([None], tf.int64)
        features = tf.TensorSpec([None, *problem.x.shape[1:]], tf.float32)

        @tf.function(input_signature=[features, rows, rows, rows])
        def fit(x: Any, y: Any, order: Any, starts: Any) -> Any:
            steps = tf.shape(starts)[0] - 1

            def step(i: Any) -> Any:
                rows = order[starts[i] : starts[i + 1]]
                labels = tf.gather(y, rows)
                if self.binary:
                    labels = tf.cast(tf.reshape(labels, (-1, 1)), tf.float32)
                with tf.GradientTape() as tape:
                    # The batch's mean, as model.fit reduces a loss (sum over batch size).
                    value = tf.reduce_mean(loss(labels, model(tf.gather(x, rows), training=True)))
                    if model.losses:
                        value += tf.add_n(model.losses)
                grads = tape.gradient(value, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
                return (i + 1,)

            return tf.while_loop(lambda i: i < steps, step, (tf.constant(0),))

        self._fit = fit

    def __call__(self, x: np.ndarray, y: np.ndarray, seed: int) -> None:
        self.model.set_weights(self.initial)
        for variable in self.state:
            variable.assign(np.zeros(variable.shape, variable.dtype.as_numpy_dtype))
        rng = np.random.default_rng(seed)
        n = len(y)
        order = np.concatenate([rng.permutation(n) for _ in range(self.epochs)])
        per_epoch = np.append(np.arange(0, n, self.batch), n)  # the last batch may be short
        starts = np.concatenate(
            [per_epoch[:-1] + e * n for e in range(self.epochs)] + [[n * self.epochs]]
        )
        self._fit(x, y.astype(np.int64), order.astype(np.int64), starts.astype(np.int64))


def fit_and_predict(
    problem: FitProblem, train: np.ndarray, held: np.ndarray, cache: dict | None = None
) -> np.ndarray:
    """Fit ``problem``'s method on rows ``train`` and return class probabilities
    ``(len(held), classes)`` for rows ``held``. ``cache`` keeps the compiled fit between
    calls (a worker's; pass a dict of your own to reuse it in-process)."""
    from tasks.heads import probabilities

    method = get_method(problem.method)
    if method.closed_form:  # no model to fit: numpy, no TensorFlow
        weights = method.fit_closed_form(problem.x[train], problem.y[train], problem.num_classes)
        return probabilities(method.predict_closed_form(weights, problem.x[held]),
                             problem.num_classes)  # fmt: skip
    import tf_keras

    from tasks.training.job import predict_in_batches

    cache = {} if cache is None else cache
    if problem.key not in cache:
        cache[problem.key] = _CompiledFit(problem)
    fit = cache[problem.key]
    tf_keras.utils.set_random_seed(problem.seed)  # the same dropout masks for the same split
    fit(problem.x[train], problem.y[train], problem.seed)
    return probabilities(predict_in_batches(fit.model, problem.x[held]), problem.num_classes)


def out_of_sample_probabilities(
    problem: FitProblem, splits: Sequence[tuple[np.ndarray, np.ndarray]], pool: Any = None
) -> list[np.ndarray]:
    """For each ``(train rows, held-out rows)`` split, the probabilities ``(held, classes)``
    of the method fitted on its train rows, in the order of ``splits``. On ``pool`` (a
    :class:`~tasks.training.engine.TrainingPool`, ``ray`` initialised) the fits run on its
    workers, a batch of splits per call; without one, in this process. A pool serves one
    caller at a time: what others submitted and finished while this waits is not theirs."""
    splits = [(np.asarray(t, np.int64), np.asarray(h, np.int64)) for t, h in splits]
    for train, _ in splits:
        if len(train) == 0:
            raise ValueError("a split has no training rows")
    if pool is None:
        cache: dict = {}
        return [fit_and_predict(problem, t, h, cache) for t, h in splits]
    import uuid

    import ray

    shared = ray.put(problem)
    per_call = max(1, -(-len(splits) // (4 * pool.size)))
    batches = [splits[i : i + per_call] for i in range(0, len(splits), per_call)]
    call = uuid.uuid4().hex[:12]  # this call's work, told apart from any other on the pool
    keys = [f"fits/{call}/{index}" for index in range(len(batches))]
    for key, batch in zip(keys, batches, strict=True):
        pool.submit(key, "fit_rows", shared, batch)
    found: dict[str, list[np.ndarray]] = {}
    error: BaseException | None = None
    while len(found) < len(batches):  # every batch, even after an error: none left behind
        for outcome in pool.wait(timeout=1.0):
            if outcome.key in keys:
                found[outcome.key] = outcome.value
                error = error or outcome.error
    if error is not None:
        raise error
    return [p for key in keys for p in found[key]]


def out_of_fold_probabilities(
    problem: FitProblem, folds: np.ndarray, pool: Any = None
) -> np.ndarray:
    """Every row's probabilities from the fit that did not see it: ``folds`` gives each row's
    fold (0..k-1); fold ``f``'s rows are predicted by a fit on all the others."""
    folds = np.asarray(folds)
    if len(folds) != len(problem.y):
        raise ValueError(f"{len(folds)} fold ids for {len(problem.y)} rows")
    kinds = np.unique(folds)
    if len(kinds) < 2:
        raise ValueError("out-of-fold probabilities need at least two folds")
    splits = [(np.flatnonzero(folds != f), np.flatnonzero(folds == f)) for f in kinds]
    out = np.zeros((len(folds), problem.num_classes))
    for (_, held), found in zip(
        splits, out_of_sample_probabilities(problem, splits, pool), strict=True
    ):
        out[held] = found
    return out
