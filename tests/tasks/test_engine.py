"""The training engine: small fits in-process and on a pool of long-lived workers, and a pool
that loses a worker."""

import numpy as np
import pytest
import ray

from storage.errors import SettingsError
from tasks.methods import Recipe
from tasks.training.engine import TrainingPool
from tasks.training.small_fits import (
    FitProblem,
    fit_and_predict,
    out_of_fold_probabilities,
    out_of_sample_probabilities,
)


def _problem(rows: int = 120, classes: int = 2, epochs: int = 5, seed: int = 0) -> FitProblem:
    """Rows whose class shifts the mean of a few features: a dense top separates them."""
    rng = np.random.default_rng(seed)
    y = np.arange(rows) % classes
    x = rng.normal(size=(rows, 32)).astype(np.float32)
    x[:, :classes] += 3.0 * np.eye(classes, dtype=np.float32)[y]
    return FitProblem(x, y, classes, recipe=Recipe(epochs=epochs))


def test_out_of_fold_probabilities_come_from_fits_that_did_not_see_the_row():
    problem = _problem(classes=3)
    folds = np.arange(len(problem.y)) % 4
    found = out_of_fold_probabilities(problem, folds)
    assert found.shape == (120, 3)
    np.testing.assert_allclose(found.sum(1), 1, atol=1e-5)
    assert (found.argmax(1) == problem.y).mean() >= 0.9
    # Row 0's probabilities are those of the fit on every other fold, and of no other fit.
    alone = fit_and_predict(problem, np.flatnonzero(folds != 0), np.flatnonzero(folds == 0))
    np.testing.assert_allclose(found[folds == 0], alone, atol=1e-5)


def test_a_reused_model_fits_as_a_fresh_one_does():
    """Weights and optimiser state go back to the start before every fit: a fit after others
    on the same compiled model gives what a fit on a new one gives."""
    problem = _problem()
    train, held = np.arange(0, 90), np.arange(90, 120)
    fresh = fit_and_predict(problem, train, held, {})
    cache: dict = {}
    fit_and_predict(problem, np.arange(30, 120), np.arange(0, 30), cache)
    fit_and_predict(problem, np.arange(0, 60), np.arange(60, 120), cache)
    np.testing.assert_allclose(fit_and_predict(problem, train, held, cache), fresh, atol=1e-5)
    # and training did something: the held-out rows are classified well, not at chance
    assert (fresh.argmax(1) == problem.y[held]).mean() >= 0.9


def test_bad_problems_are_one_line_errors():
    problem = _problem()
    with pytest.raises(ValueError, match="rows"):
        FitProblem(problem.x, problem.y[:-1], 2)
    with pytest.raises(ValueError, match="two folds"):
        out_of_fold_probabilities(problem, np.zeros(len(problem.y)))
    with pytest.raises(ValueError, match="no training rows"):
        out_of_sample_probabilities(problem, [(np.array([], np.int64), np.arange(3))])
    with pytest.raises(SettingsError, match="no small fits"):
        fit_and_predict(FitProblem(problem.x, problem.y, 2, method="finetune"), [0], [1])


@pytest.mark.slow
def test_small_fits_on_the_pool_equal_those_in_process(ray_local):
    problem = _problem(classes=3)
    splits = [
        (np.flatnonzero(np.arange(120) % 6 != f), np.flatnonzero(np.arange(120) % 6 == f))
        for f in range(6)
    ]
    here = out_of_sample_probabilities(problem, splits)
    with TrainingPool(2) as pool:
        assert pool.started(timeout=300) == 2  # both take work, not one before the other starts
        there = out_of_sample_probabilities(problem, splits, pool)
        assert len(pool.workers) == 2 and pool.replaced == 0
        # A piece of work that fails is reported; its worker stays and takes the next.
        bad = FitProblem(problem.x, problem.y, 3, method="scratch")
        pool.submit("bad", "fit_rows", bad, splits[:1])
        (outcome,) = pool.drain()
        assert isinstance(outcome.error, SettingsError) and pool.replaced == 0
    for a, b in zip(here, there, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def _kill_the_worker_of(pool: TrainingPool, key: str) -> list:
    """Kill the worker running ``key``; what the pool reported meanwhile."""
    while pool.worker_of(key) is None:
        assert not pool.wait(timeout=0.5), "it finished before it could be killed"
    actor = pool.worker_of(key)
    ray.kill(actor, no_restart=True)
    seen = []
    while pool.worker_of(key) is actor:  # until the pool has seen it die
        seen.extend(pool.wait(timeout=0.5))
    return seen


@pytest.mark.slow
def test_a_worker_that_dies_is_replaced_and_its_work_runs_again(ray_local):
    problem = _problem(epochs=100)  # long enough to be killed
    split = [(np.arange(0, 100), np.arange(100, 120))]
    with TrainingPool(1, max_failures=1) as pool:
        pool.submit("fit", "fit_rows", problem, split)
        (outcome,) = _kill_the_worker_of(pool, "fit") + pool.drain()
        assert outcome.error is None and outcome.attempts == 2 and pool.replaced == 1
        assert outcome.value[0].shape == (20, 2)
        # Past max_failures, the work is reported as failed.
        pool.submit("again", "fit_rows", problem, split)
        assert not _kill_the_worker_of(pool, "again")
        (outcome,) = _kill_the_worker_of(pool, "again") + pool.drain()
        assert isinstance(outcome.error, ray.exceptions.RayActorError) and outcome.attempts == 2
        assert pool.replaced == 3
