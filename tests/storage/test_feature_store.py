import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage.feature_store import (
    FeatureStore,
    feature_schema,
    rows_to_batch,
    tap_column,
    write_shard_atomically,
)
from storage.layout import StoreLayout, part_name
from storage.manifest import Manifest, Reject, ShardRecord, TapRecord, read_manifest, write_manifest

TAPS = {
    "bottleneck": TapRecord((4,), "float16"),
    "last_block_input": TapRecord((2, 2, 3), "float32"),
}


def _batch(schema, n, offset=0):
    rng = np.random.default_rng(offset)
    return rows_to_batch(
        schema,
        {
            "image_id": [f"id{offset + i}" for i in range(n)],
            "path": [f"a/{offset + i}.jpg" for i in range(n)],
            "label": ["a"] * n,
            "label_index": [0] * n,
            "split": ["train"] * n,
            "copy": [0] * n,
            tap_column("bottleneck"): rng.normal(size=(n, 4)),
            tap_column("last_block_input"): rng.normal(size=(n, 2, 2, 3)),
        },
    )


def _manifest(layout, shards):
    return Manifest(
        dataset="d", dataset_root="/d", dataset_fingerprint="f", classes=("a", "b"),
        backbone="bb", weights_source="none", weights_sha256="", input_size=(8, 8),
        runtime="litert", augment_copies=0, augment_policy={}, seed=0, taps=TAPS,
        feature_fingerprint="ff", num_shards=2, split_sizes={"train": 5}, wf_version="0",
        shards=shards,
    )  # fmt: skip


def test_shard_roundtrip_through_manifest(tmp_path):
    layout = StoreLayout.at(str(tmp_path))
    schema = feature_schema(TAPS, ["a", "b"])
    path = layout.part_path("d", "bb", "train", 0, 2)
    written = write_shard_atomically(
        layout, path, schema, [_batch(schema, 3), _batch(schema, 2, 3)]
    )
    assert written.rows == 5 and os.path.basename(path) == part_name(0, 2)
    record = ShardRecord("train", 0, 2, layout.relative(path), "fp", 5, 5,
                         (Reject("a/x.jpg", "train", "empty", "zero bytes"),), written.sha256,
                         written.size_bytes, 0.1)  # fmt: skip
    manifest = _manifest(layout, {record.key: record})
    write_manifest(layout.filesystem, layout.manifest_path("d", "bb"), manifest)
    again = read_manifest(layout.filesystem, layout.manifest_path("d", "bb"))
    assert again == manifest and again.manifest_id == manifest.manifest_id

    store = FeatureStore.open(str(tmp_path), "d", "bb")
    features, labels = store.read_numpy("train", "last_block_input")
    assert features.shape == (5, 2, 2, 3) and features.dtype == np.float32
    assert labels.tolist() == [0] * 5
    half, _ = store.read_numpy("train", "bottleneck")
    assert half.dtype == np.float16
    expected = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float16)
    np.testing.assert_array_equal(half[:3], expected)
    # Any Parquet reader sees the shapes in the schema metadata.
    file_schema = pq.read_schema(path)
    assert json.loads(file_schema.field(tap_column("last_block_input")).metadata[b"shape"]) == [
        2,
        2,
        3,
    ]
    assert json.loads(file_schema.metadata[b"wf.classes"]) == ["a", "b"]


def test_killed_shard_write_leaves_no_visible_file(tmp_path):
    """SIGKILL a process in the middle of a shard write: no part file, nothing a reader lists."""
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import time, pathlib
        from storage.layout import StoreLayout
        from storage.feature_store import feature_schema, write_shard_atomically
        from tests.storage.test_feature_store import TAPS, _batch
        layout = StoreLayout.at({str(tmp_path / "store")!r})
        schema = feature_schema(TAPS, ["a", "b"])
        def batches():
            yield _batch(schema, 50)
            pathlib.Path({str(ready)!r}).write_text("1")
            time.sleep(600)
            yield _batch(schema, 50, 50)
        path = layout.part_path("d", "bb", "train", 0, 1)
        write_shard_atomically(layout, path, schema, batches())
    """)
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    try:
        deadline = time.time() + 60
        while not ready.exists():
            assert process.poll() is None, "writer died before the kill"
            assert time.time() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        process.kill()
    layout = StoreLayout.at(str(tmp_path / "store"))
    split_dir = layout.split_dir("d", "bb", "train")
    left = os.listdir(split_dir)
    assert left and all(name.startswith(".") for name in left), left
    assert layout.part_files("d", "bb") == []
    with pytest.raises(FileNotFoundError):
        pq.read_table(layout.part_path("d", "bb", "train", 0, 1))
