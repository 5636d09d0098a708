"""How `wf suggest` chooses a batch, on embeddings whose answer is known."""

import numpy as np

from tasks.audit import normalise
from tasks.training.small_fits import FitProblem, out_of_fold_probabilities
from workflows.label.suggest import choose_batch, margin_scores


def _clusters(rng, centres, per, noise=0.05):
    return np.concatenate([c + noise * rng.normal(size=(per, len(c))) for c in centres])


def test_margin_is_one_for_a_coin_toss_and_zero_for_a_sure_answer():
    np.testing.assert_allclose(margin_scores(np.array([[0.5, 0.5], [1.0, 0.0]])), [1.0, 0.0])
    np.testing.assert_allclose(margin_scores(np.array([[0.2, 0.7, 0.1]])), [0.5])


def test_near_copies_of_one_confusing_image_cost_one_label_and_classes_are_balanced():
    rng = np.random.default_rng(0)
    dim = 16
    centres = normalise(rng.normal(size=(4, dim)))
    labelled = normalise(_clusters(rng, centres, 5))
    # Pool: 30 near-copies of one very uncertain image, and 4 spread-out groups of 10.
    confusing = normalise(centres[0] + centres[1] + 0.001 * rng.normal(size=(30, dim)))
    spread = normalise(_clusters(rng, centres, 10, noise=0.4))
    pool = np.concatenate([confusing, spread])
    scores = np.r_[np.full(30, 0.99), rng.uniform(0.2, 0.6, 40)]
    predicted = np.r_[np.zeros(30, int), np.repeat(np.arange(4), 10)]
    plain, _ = choose_batch(pool, labelled, scores, predicted, 4, 8, spread=False, balance=False)
    chosen, reasons = choose_batch(pool, labelled, scores, predicted, 4, 8)
    # Uncertainty alone would take the copies; near duplicates are left out even then.
    assert sum(i < 30 for i in plain) == 1
    assert sum(i < 30 for i in chosen) == 1 and reasons[0] == "uncertain" and chosen[0] < 30
    assert len(set(chosen)) == 8
    assert np.bincount(predicted[chosen], minlength=4).max() <= 2  # at most its share, 8 / 4
    assert set(reasons) <= {"uncertain", "spread", "balance"}
    # An image that is a copy of a labelled one is never suggested.
    copy = labelled[:1]
    found, _ = choose_batch(np.concatenate([copy, pool]), labelled, np.r_[1.0, scores],
                            np.r_[0, predicted], 4, 8)  # fmt: skip
    assert 0 not in found


def test_balance_gives_way_when_a_class_has_no_candidates_left():
    rng = np.random.default_rng(1)
    pool = normalise(rng.normal(size=(12, 8)))
    predicted = np.r_[np.zeros(10, int), np.ones(2, int)]
    chosen, _ = choose_batch(pool, np.zeros((0, 8)), rng.uniform(size=12), predicted, 2, 8)
    assert len(chosen) == 8 and set(np.flatnonzero(predicted == 1)) <= set(chosen)


def test_prototype_small_fits_run_in_numpy_out_of_fold():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(3, 20)) * 3
    y = np.repeat(np.arange(3), 10)
    x = (centres[y] + rng.normal(size=(30, 20))).astype(np.float32)
    probs = out_of_fold_probabilities(FitProblem(x, y, 3, "prototype"), np.arange(30) % 5)
    assert probs.shape == (30, 3) and np.allclose(probs.sum(axis=1), 1)
    assert (probs.argmax(axis=1) == y).mean() > 0.9
