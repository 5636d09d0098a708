"""The work of `wf audit` on stored embeddings: neighbours, duplicate groups, outlier scores and
the neighbours' label votes. Plain functions on numpy arrays. (The out-of-fold probabilities the
label check also reads come from the training engine: :mod:`workflows.train.cross_validate`.)

Embeddings are the stored ``bottleneck`` tap (pooled ImageNet features), L2-normalised, so a dot
product is a cosine similarity and ``1 - cosine`` a distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 2048  # rows of the similarity matrix computed at once: memory stays at BLOCK x n floats


def normalise(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float32).reshape(len(features), -1)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class Neighbours:
    """Each row's ``k`` nearest other rows and their cosine similarities, nearest first."""

    index: np.ndarray  # (n, k) int
    similarity: np.ndarray  # (n, k) float

    @property
    def distance(self) -> np.ndarray:
        return 1.0 - self.similarity


def nearest(embeddings: np.ndarray, k: int = 10) -> Neighbours:
    """Exact k-nearest neighbours by cosine, a block of rows at a time."""
    n = len(embeddings)
    k = max(1, min(k, n - 1))
    index = np.zeros((n, k), np.int64)
    similarity = np.zeros((n, k), np.float32)
    for start in range(0, n, BLOCK):
        block = embeddings[start : start + BLOCK] @ embeddings.T
        rows = np.arange(len(block))
        block[rows, start + rows] = -np.inf  # not its own neighbour
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(block, top, axis=1), axis=1)
        index[start : start + BLOCK] = np.take_along_axis(top, order, axis=1)
        similarity[start : start + BLOCK] = np.take_along_axis(
            block, index[start : start + BLOCK], axis=1
        )
    return Neighbours(index, similarity)


def relative_scale(neighbours: Neighbours) -> float:
    """The typical distance between images that are not copies of one another: the median
    distance to the k-th neighbour. (cleanlab's Datalab scales by the median distance to the
    first neighbour, which is zero when most images have a copy: then nothing is flagged.)"""
    return float(np.median(neighbours.distance[:, -1]))


def near_pairs(
    neighbours: Neighbours, similarity: float | None, relative: float | None
) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, cosine)`` with ``i < j`` closer than every threshold given: cosine at least
    ``similarity``, and distance at most ``relative`` x :func:`relative_scale`."""
    limit = np.full(neighbours.similarity.shape, True)
    if similarity is not None:
        limit &= neighbours.similarity >= similarity
    if relative is not None:
        limit &= neighbours.distance <= relative * relative_scale(neighbours)
    if similarity is None and relative is None:
        return []
    pairs = {}
    for i, slot in zip(*np.nonzero(limit), strict=True):
        j = int(neighbours.index[i, slot])
        key = (min(int(i), j), max(int(i), j))
        pairs[key] = max(pairs.get(key, -1.0), float(neighbours.similarity[i, slot]))
    return [(i, j, s) for (i, j), s in sorted(pairs.items())]


def groups(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components of ``pairs`` (union-find) with two or more members, each sorted,
    ordered by their first member."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(root(i), []).append(i)
    return sorted((m for m in members.values() if len(m) > 1), key=lambda m: m[0])


def outlier_scores(
    neighbours: Neighbours, embeddings: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """How far each image is from everything: the mean distance to its neighbours, and to its
    class's centre, each as a multiple of its median over the dataset, averaged."""
    knn = neighbours.distance.mean(axis=1)
    centres = {
        c: normalise(embeddings[labels == c].mean(0, keepdims=True))[0] for c in np.unique(labels)
    }
    to_class = np.array([1.0 - embeddings[i] @ centres[c] for i, c in enumerate(labels)])
    return (knn / max(np.median(knn), 1e-9) + to_class / max(np.median(to_class), 1e-9)) / 2


def neighbour_votes(neighbours: Neighbours, labels: np.ndarray, classes: int) -> np.ndarray:
    """Each row's class probabilities from the labels of its ``k`` nearest other rows (one vote
    each, itself excluded: out of sample by construction), as cleanlab's Datalab does."""
    votes = np.zeros((len(labels), classes))
    rows = np.arange(len(labels))
    for slot in range(neighbours.index.shape[1]):
        np.add.at(votes, (rows, labels[neighbours.index[:, slot]]), 1.0)
    return votes / votes.sum(axis=1, keepdims=True)
