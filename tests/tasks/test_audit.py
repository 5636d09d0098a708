"""The audit's arithmetic on made-up embeddings: neighbours, groups, thresholds, votes."""

import numpy as np

from tasks.audit import (
    groups,
    near_pairs,
    nearest,
    neighbour_votes,
    normalise,
    outlier_scores,
    relative_scale,
)


def _points(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    return normalise(np.random.default_rng(seed).normal(size=(n, dim)))


def test_nearest_finds_the_closest_others_in_order():
    x = _points(50)
    x[7] = normalise(x[3:4] + 0.01)[0]  # 7 is almost 3
    found = nearest(x, k=5)
    assert found.index[3, 0] == 7 and found.index[7, 0] == 3
    assert (np.diff(found.similarity, axis=1) <= 1e-6).all() and (
        found.index != np.arange(50)[:, None]
    ).all()
    exact = x @ x.T
    np.fill_diagonal(exact, -np.inf)
    np.testing.assert_array_equal(np.sort(found.index[0]), np.sort(np.argsort(-exact[0])[:5]))


def test_groups_are_connected_components():
    assert groups(6, [(0, 1), (1, 2), (4, 5)]) == [[0, 1, 2], [4, 5]]
    assert groups(3, []) == []


def test_the_relative_threshold_holds_when_most_images_are_copies():
    # 40 distinct images, each with a near copy: Datalab's scale (median distance to the first
    # neighbour) is about zero here and flags nothing; the 10th-neighbour scale flags every pair.
    base = _points(40)
    copies = normalise(base + np.random.default_rng(1).normal(scale=0.02, size=base.shape))
    x = np.concatenate([base, copies])
    found = nearest(x, k=10)
    first_neighbour_scale = float(np.median(found.distance[:, 0]))
    assert first_neighbour_scale < 0.01 < relative_scale(found)
    pairs = near_pairs(found, similarity=None, relative=0.2)
    assert {(i, j) for i, j, _ in pairs} == {(i, i + 40) for i in range(40)}
    assert near_pairs(found, similarity=0.9999, relative=0.2) == []  # both thresholds must hold


def test_outliers_score_above_the_typical_image():
    x = _points(60, dim=8)
    x[:30] = normalise(x[:30] * 0.1 + np.array([1.0] + [0.0] * 7))  # a tight class 0
    x[30:] = normalise(x[30:] * 0.1 + np.array([0.0, 1.0] + [0.0] * 6))  # a tight class 1
    x[5] = normalise(np.array([[0.0] * 7 + [1.0]]))[0]  # far from everything
    labels = np.array([0] * 30 + [1] * 30)
    scores = outlier_scores(nearest(x, k=5), x, labels)
    assert int(np.argmax(scores)) == 5 and scores[5] > 3 * np.median(scores)


def test_neighbour_votes_are_out_of_sample_class_shares():
    x = normalise(np.array([[1.0, 0.0], [0.99, 0.1], [0.98, 0.2], [0.0, 1.0], [0.1, 0.99]]))
    labels = np.array([0, 0, 1, 1, 1])  # row 2 sits among class 0 with the label 1
    votes = neighbour_votes(nearest(x, k=2), labels, 2)
    assert np.allclose(votes.sum(1), 1)
    np.testing.assert_allclose(votes[2], [1.0, 0.0])  # its own label never votes for it
    np.testing.assert_allclose(votes[3], [0.0, 1.0])
