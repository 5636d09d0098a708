"""The planned images' own checks: the external sort against one sort in memory, and the order
of use (every image added, then read)."""

import numpy as np
import pyarrow as pa
import pytest

import workflows.planned
from workflows.planned import PLANNED, SORT_KEYS, PlannedImages


def _rows(n: int, rng: np.random.Generator, labels: int) -> pa.Table:
    index = rng.integers(-1, labels, n).astype(np.int32)  # -1: unlabelled
    order = [int(v).to_bytes(8, "big") for v in rng.permutation(10 * n)[:n]]
    return pa.table({
        "path": pa.nulls(n, pa.binary()), "relative_path": [f"p{i}" for i in range(n)],
        "size": np.arange(n, dtype=np.int64), "mtime_ns": np.zeros(n, np.int64),
        "label_index": index, "order": order,
    }, schema=PLANNED)  # fmt: skip


@pytest.mark.parametrize(("rows", "shards", "skew"), [(0, 3, False), (1, 1, False),
                                                      (57, 1, False), (200, 5, True),
                                                      (300, 9, False)])  # fmt: skip
def test_the_merge_gives_one_sort_of_the_split(monkeypatch, rows, shards, skew):
    """Runs of at most 7 rows (a larger shard is a run as it is), merged 2 at a time in rounds:
    the split comes out as one sort of all its rows would give it, and nothing is left on disk
    but the sorted shards."""
    import os

    monkeypatch.setattr(workflows.planned, "GROUPS", 2)
    monkeypatch.setattr(workflows.planned, "MERGE_FAN_IN", 2)
    monkeypatch.setattr(workflows.planned, "MERGE_ROWS", 7)
    monkeypatch.setattr(workflows.planned, "MERGE_MIN_BATCH", 2)
    monkeypatch.setattr(workflows.planned, "BUFFER_ROWS", 16)
    rng = np.random.default_rng(rows + shards)
    planned = PlannedImages(("a", "b", "c"), "/root", ("train",), shards)
    table = _rows(rows, rng, 3)
    where = (rng.integers(0, 2, rows) * (shards - 1) if skew
             else rng.integers(0, shards, rows)).astype(np.int64)  # fmt: skip
    for start in range(0, rows, 13):
        planned.add("train", table.slice(start, 13), where[start : start + 13])
    planned.close()
    chunks = list(planned.merged("train"))
    merged = pa.concat_tables(chunks) if chunks else PLANNED.empty_table()
    assert merged.equals(table.sort_by(SORT_KEYS))
    assert sum(planned.size("train", s) for s in range(shards)) == rows
    assert planned.split_size("train") == rows
    assert planned.split_size("train", ("a", "c")) == int(np.sum(table["label_index"].to_numpy()
                                                                 != 1))  # fmt: skip
    left = sorted(os.listdir(planned._keep.name))
    assert left == sorted(f"train-{s}.sorted.arrow" for s in range(shards))


def test_images_are_read_only_once_all_are_added():
    planned = PlannedImages(("a", "b"), "/root", ("train",), 2)
    planned.add("train", _rows(3, np.random.default_rng(0), 2), np.array([0, 1, 1]))
    with pytest.raises(RuntimeError, match="close"):
        planned.shard("train", 1)
    with pytest.raises(RuntimeError, match="close"):
        list(planned.merged("train"))
    planned.close()
    assert len(planned.shard("train", 1).load()) == 2
    with pytest.raises(RuntimeError, match="closed"):
        planned.add("train", _rows(1, np.random.default_rng(1), 2), np.array([0]))
