"""Part files, manifests with commit records, and the reader's checks, on a local store."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage.errors import StoreError
from storage.feature_store import (
    FeatureStore,
    feature_schema,
    rows_to_batch,
    tap_column,
    write_part,
)
from storage.layout import StoreLayout
from storage.manifest import (
    Manifest,
    Reject,
    ShardRecord,
    TapRecord,
    commit_shard,
    compact,
    read_manifest,
    write_manifest,
)

TAPS = {
    "bottleneck": TapRecord((4,), "float16"),
    "last_block_input": TapRecord((2, 2, 3), "float32"),
}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _batch(schema, n, offset=0, label_index=0):
    rng = np.random.default_rng(offset)
    return rows_to_batch(
        schema,
        {
            "image_id": [f"id{offset + i}" for i in range(n)],
            "path": [f"a/{offset + i}.jpg" for i in range(n)],
            "label": ["ab"[label_index]] * n,
            "label_index": [label_index] * n,
            "split": ["train"] * n,
            "copy": [0] * n,
            tap_column("bottleneck"): rng.normal(size=(n, 4)),
            tap_column("last_block_input"): rng.normal(size=(n, 2, 2, 3)),
        },
    )


def manifest_for(shards=None, num_shards=1, **changes) -> Manifest:
    base = Manifest(
        dataset="d", dataset_root="/d", dataset_fingerprint="f", classes=("a", "b"),
        backbone="bb", weights_source="none", weights_sha256="", input_size=(8, 8),
        runtime="litert", augment_copies=0, augment_policy={}, seed=0, taps=TAPS,
        feature_fingerprint="ff", num_shards=num_shards, split_sizes={"train": 5},
        wf_version="0", shards=shards or {},
    )  # fmt: skip
    return replace(base, **changes)


def write_store(root, shards=1, rows=(5,)) -> tuple[StoreLayout, Manifest]:
    """A committed store of ``shards`` train shards of ``rows`` rows each (label a, then b)."""
    layout = StoreLayout.at(str(root))
    schema = feature_schema(TAPS, ["a", "b"])
    manifest = manifest_for(num_shards=shards)
    write_manifest(layout, manifest)
    for shard in range(shards):
        path = layout.part_path("d", "bb", "train", shard, shards, f"attempt{shard}")
        written = write_part(
            layout, path, schema, [_batch(schema, rows[shard], 10 * shard, shard % 2)]
        )
        counts = (rows[shard], 0) if shard % 2 == 0 else (0, rows[shard])
        reject = Reject("a/x.jpg", "train", "empty", "zero bytes")
        record = ShardRecord("train", shard, shards, layout.relative(path), "fp", rows[shard],
                             written.rows, (reject,), written.sha256, written.size_bytes, 0.1,
                             class_images=counts)  # fmt: skip
        assert commit_shard(layout, manifest, record) < 2000  # one small record per shard
        manifest = manifest.with_shard(record)
    return layout, manifest


def test_part_roundtrip_through_commits_and_compaction(tmp_path):
    layout, manifest = write_store(tmp_path)
    # Before compaction the manifest file has no shards; readers fold the run's commit record.
    on_disk = json.loads((tmp_path / "d" / "bb" / "manifest.json").read_text())
    assert on_disk["shards"] == {}
    assert read_manifest(layout, "d", "bb").shards == manifest.shards
    compact(layout, manifest)
    assert not (tmp_path / "d" / "bb" / "_commits").exists()
    assert read_manifest(layout, "d", "bb") == manifest

    store = FeatureStore.open(str(tmp_path), "d", "bb")
    store.verify_parts()
    features, labels = store.read_numpy("train", "last_block_input")
    assert features.shape == (5, 2, 2, 3) and features.dtype == np.float32
    assert labels.tolist() == [0] * 5
    half, _ = store.read_numpy("train", "bottleneck")
    assert half.dtype == np.float16
    expected = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float16)
    np.testing.assert_array_equal(half[:3], expected)
    (path,) = store.files("train")
    file_schema = pq.read_schema(path)  # any Parquet reader sees the shapes
    assert json.loads(file_schema.field(tap_column("last_block_input")).metadata[b"shape"]) == [
        2,
        2,
        3,
    ]
    assert json.loads(file_schema.metadata[b"wf.classes"]) == ["a", "b"]
    # Taps (float16 and float32) are written split by byte, without a dictionary; the row
    # fields keep theirs.
    columns = pq.ParquetFile(path).metadata.row_group(0)
    encodings = {
        columns.column(i).path_in_schema: set(columns.column(i).encodings)
        for i in range(columns.num_columns)
    }
    for name in ("bottleneck", "last_block_input"):
        tap = encodings[f"{tap_column(name)}.list.element"]
        assert "BYTE_STREAM_SPLIT" in tap and not tap & {"PLAIN_DICTIONARY", "RLE_DICTIONARY"}
    assert encodings["path"] & {"PLAIN_DICTIONARY", "RLE_DICTIONARY"}
    # The hash computed while streaming is the file's.
    import hashlib

    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert digest == manifest.shards["train/00000"].sha256


def test_commit_records_of_another_run_are_ignored(tmp_path):
    layout, _ = write_store(tmp_path, shards=2, rows=(3, 4))
    assert set(read_manifest(layout, "d", "bb").shards) == {"train/00000", "train/00001"}
    # A new run (new run id, no shards yet): the old run's records no longer count.
    write_manifest(layout, manifest_for(num_shards=2))
    assert read_manifest(layout, "d", "bb").shards == {}


def test_reader_checks_every_part_against_its_record(tmp_path):
    layout, manifest = write_store(tmp_path, shards=2, rows=(3, 4))
    FeatureStore.open(layout, "d", "bb").verify_parts()
    assert FeatureStore.open(layout, "d", "bb").empty_classes() == []
    (first, second) = sorted(r.file for r in manifest.shards.values())
    # A part rewritten with other rows: size (or rows) no longer match the manifest.
    schema = feature_schema(TAPS, ["a", "b"])
    write_part(layout, layout.absolute(second), schema, [_batch(schema, 9)])
    with pytest.raises(StoreError, match=r"part .*-attempt1\.parquet has .* the manifest says"):
        FeatureStore.open(layout, "d", "bb").verify_parts()
    os.remove(layout.absolute(first))
    with pytest.raises(StoreError, match=r"-attempt0\.parquet named by the manifest is missing"):
        FeatureStore.open(layout, "d", "bb").verify_parts()


def test_incomplete_store_and_empty_class_are_refused(tmp_path):
    layout, _ = write_store(tmp_path, shards=1)
    write_manifest(layout, replace(read_manifest(layout, "d", "bb"), num_shards=2))
    with pytest.raises(StoreError, match="incomplete: shards train/00001"):
        FeatureStore.open(layout, "d", "bb").verify_parts()
    assert FeatureStore.open(layout, "d", "bb").empty_classes() == ["b"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "expected a JSON object"),
        ("{", "unreadable"),
        ('{"format_version": 2}', "unreadable"),
    ],
)
def test_a_manifest_that_is_not_one_is_a_one_line_error(tmp_path, content, message):
    (tmp_path / "d" / "bb").mkdir(parents=True)
    (tmp_path / "d" / "bb" / "manifest.json").write_text(content)
    with pytest.raises(StoreError, match=message) as caught:
        FeatureStore.open(str(tmp_path), "d", "bb")
    assert "\n" not in str(caught.value)


def test_killed_part_write_leaves_no_visible_file(tmp_path):
    """SIGKILL a process in the middle of a part write: no part file, nothing a reader lists."""
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import time, pathlib
        from storage.layout import StoreLayout
        from storage.feature_store import feature_schema, write_part
        from tests.storage.test_feature_store import TAPS, _batch
        layout = StoreLayout.at({str(tmp_path / "store")!r})
        schema = feature_schema(TAPS, ["a", "b"])
        def batches():
            yield _batch(schema, 50)
            pathlib.Path({str(ready)!r}).write_text("1")
            time.sleep(600)
            yield _batch(schema, 50, 50)
        write_part(layout, layout.part_path("d", "bb", "train", 0, 1, "x"), schema, batches())
    """)
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
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
    left = os.listdir(tmp_path / "store" / "d" / "bb" / "train")
    assert left and all(name.startswith(".") for name in left), left
    assert layout.part_files("d", "bb") == []
