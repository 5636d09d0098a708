"""`wf verify`'s checks: every part against the manifest, every artifact against its index."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from storage.layout import StoreLayout
from storage.runs import RunsLayout, named_weights_from_bytes, named_weights_to_bytes
from storage.verify import VerifyReport, verify_runs, verify_store
from tests.storage.test_feature_store import write_store


def test_a_changed_byte_in_a_part_is_found_and_named(tmp_path):
    layout, manifest = write_store(tmp_path / "store", shards=2, rows=(3, 4))
    report = VerifyReport()
    verify_store(layout, report)
    assert report.checked == 2 and report.problems == []
    path = layout.absolute(manifest.shards["train/00001"].file)
    original = Path(path).read_bytes()
    # A byte in the middle of the largest column's values: same size, same footer, so only
    # the SHA-256 can tell.
    chunks = pq.ParquetFile(path).metadata.row_group(0)
    largest = max((chunks.column(i) for i in range(chunks.num_columns)),
                  key=lambda c: c.total_compressed_size)  # fmt: skip
    data = bytearray(original)
    data[largest.data_page_offset + largest.total_compressed_size // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    report = VerifyReport()
    verify_store(StoreLayout.at(str(tmp_path / "store")), report)
    assert (
        len(report.problems) == 1 and path in report.problems[0] and "SHA-256" in report.problems[0]
    )
    # A byte of the footer: one line that says so, not a traceback.
    data = bytearray(original)
    data[-20] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    report = VerifyReport()
    verify_store(StoreLayout.at(str(tmp_path / "store")), report)
    assert len(report.problems) == 1 and "Parquet footer cannot be read" in report.problems[0]


def test_runs_artifacts_are_checked_against_their_index(tmp_path):
    runs = RunsLayout(str(tmp_path / "runs"))
    job = runs.job("d", "bottleneck")
    job.write("model.keras", b"model bytes")
    job.write_json("metrics.json", {"accuracy": 1.0})
    job.write_index(["model.keras", "metrics.json"])
    assert job.exists() and [j.dir for j in runs.jobs()] == [job.dir]
    report = VerifyReport()
    verify_runs(runs, report)
    assert report.checked == 2 and report.problems == []
    job.write("model.keras", b"model bytez")
    report = VerifyReport()
    verify_runs(runs, report)
    assert report.problems == [f"{job.model}: SHA-256 differs from artifacts.json"]


def test_named_weights_round_trip_without_pickle():
    weights = {
        "dense": [np.ones((2, 3), np.float32), np.zeros(3, np.float32)],
        "a/b": [np.arange(4)],
    }
    again = named_weights_from_bytes(named_weights_to_bytes(weights))
    assert list(again) == ["dense", "a/b"]
    for name in weights:
        for x, y in zip(weights[name], again[name], strict=True):
            np.testing.assert_array_equal(x, y)
