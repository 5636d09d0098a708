"""The extraction pipeline on a real local Ray cluster: sharding, incremental re-runs,
quarantine of bad files and store resets."""

from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from storage.feature_store import FeatureStore
from storage.hashing import content_id
from tasks.extract_shard import ImageItem
from tests.conftest import make_dataset
from workflows.extract import plan_shards, run_extract
from workflows.settings import DatasetSource, ExtractSettings


def _items(count: int) -> tuple[ImageItem, ...]:
    return tuple(ImageItem(f"/x/{i}", f"c/{i}.jpg", str(i), "c", 0) for i in range(count))


def test_adding_images_never_moves_existing_ones():
    before = plan_shards(_items(100), 8)
    after = plan_shards(_items(150), 8)
    for old, new in zip(before, after, strict=True):
        assert set(old) <= set(new)
    assert sum(len(s) for s in after) == 150 and all(before)


def _settings(tmp_path, cache_dir, **overrides) -> ExtractSettings:
    base = ExtractSettings(
        datasets=(DatasetSource(str(tmp_path / "shapes")),),
        store=str(tmp_path / "store"),
        shards=4,
        input_size=48,
        augment=1,
        cache_dir=cache_dir,
    )
    return replace(base, **overrides)


def _by_key(store: FeatureStore) -> dict[str, tuple[str, str]]:
    return {k: (r.sha256, r.input_fingerprint) for k, r in store.manifest.shards.items()}


@pytest.mark.slow
def test_rerun_recomputes_only_changed_shards(tmp_path, cache_dir, ray_local):
    make_dataset(tmp_path / "shapes", ("circles", "squares"), 16)
    settings = _settings(tmp_path, cache_dir)
    (first,) = run_extract(settings)
    assert (first.shards_done, first.shards_skipped, first.rejects) == (8, 0, 0)
    store = FeatureStore.open(settings.store, "shapes", "efficientnet_lite0")
    assert store.manifest.is_complete()
    before = _by_key(store)

    (again,) = run_extract(settings)
    assert (again.shards_done, again.shards_skipped) == (0, 8)

    make_dataset(tmp_path / "shapes", ("circles", "squares"), 17)  # one new image per class
    (third,) = run_extract(settings)
    after = _by_key(FeatureStore.open(settings.store, "shapes", "efficientnet_lite0"))
    changed = {k for k in after if after[k] != before[k]}
    assert 1 <= third.shards_done == len(changed) <= 2 and third.shards_skipped == 8 - len(changed)
    assert third.images == sum(
        r.images for k, r in FeatureStore.open(settings.store, "shapes", "efficientnet_lite0")
        .manifest.shards.items() if k in changed
    )  # fmt: skip

    # A setting that alters features makes a new store: every shard redone, nothing mixed.
    (fourth,) = run_extract(replace(settings, augment=2))
    store = FeatureStore.open(settings.store, "shapes", "efficientnet_lite0")
    assert (fourth.shards_done, fourth.shards_skipped) == (8, 0)
    assert store.manifest.augment_copies == 2
    copies = store.read_table("train", ["copy"])["copy"].to_pylist()
    assert set(copies) == {0, 1, 2} and copies.count(0) * 3 == len(copies)

    # Fewer shards: the old part files go, the new ones are all the store has.
    (fifth,) = run_extract(replace(settings, augment=2, shards=2))
    store = FeatureStore.open(settings.store, "shapes", "efficientnet_lite0")
    assert fifth.shards_done == 4
    assert len(store.layout.part_files("shapes", "efficientnet_lite0")) == 4


@pytest.mark.slow
def test_bad_files_are_quarantined_and_the_run_goes_on(tmp_path, cache_dir, ray_local):
    make_dataset(tmp_path / "shapes", ("circles", "squares"), 6)
    circles = tmp_path / "shapes" / "circles"
    (circles / "empty.jpg").write_bytes(b"")
    (circles / "notes.jpg").write_text("not an image")
    good = (circles / "circles_0000.jpg").read_bytes()
    (circles / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (circles / ".DS_Store").write_bytes(b"\0\0")
    settings = _settings(tmp_path, cache_dir, validation_fraction=0.0, augment=0)
    (report,) = run_extract(settings)
    assert report.shards_failed == 0 and report.images == 12 and report.rejects == 3
    store = FeatureStore.open(settings.store, "shapes", "efficientnet_lite0")
    rejects = pq.read_table(store.layout.rejects_path("shapes", "efficientnet_lite0")).to_pylist()
    reasons = {r["path"]: r["reason"] for r in rejects}
    assert reasons == {
        "circles/empty.jpg": "empty",
        "circles/notes.jpg": "not_an_image",
        "circles/truncated.jpg": "corrupt",
    }
    table = store.read_table("train", ["image_id", "path"])
    assert table.num_rows == 12
    assert content_id(good) in table["image_id"].to_pylist()
