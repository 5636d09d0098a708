"""The extraction pipeline on a real local Ray cluster: sharding, incremental re-runs, the bad-
input corpus and the fuzzed files quarantined, empty classes, and one writer per store."""

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import workflows.extract.run
from storage.errors import StoreBusyError
from storage.feature_store import FeatureStore
from storage.layout import StoreLayout
from storage.verify import VerifyReport, verify_store
from tasks.extract_shard import STAGES, ImageItem, Images
from tests.conftest import make_dataset
from tests.corpus import fuzzed_images, write_bad_input_corpus
from workflows.extract.plan import plan_shards
from workflows.extract.run import run_extract
from workflows.extract.settings import DatasetSource, ExtractSettings

ROOT = Path(__file__).resolve().parents[2]


def _items(count: int) -> Images:
    items = (ImageItem(f"/x/c/{i}.jpg", f"c/{i}.jpg", 1, "c", 0) for i in range(count))
    return Images.of(items, ("c",), "/x")


def test_adding_images_never_moves_existing_ones():
    before = plan_shards(_items(100), 8)
    after = plan_shards(_items(150), 8)
    for old, new in zip(before, after, strict=True):
        assert set(old) <= set(new)
        assert list(old.relative_paths()) == sorted(
            old.relative_paths(), key=lambda p: int(p[2:-4])
        )
    assert sum(len(s) for s in after) == 150 and all(len(s) for s in before)


def _settings(tmp_path, cache_dir, folder="shapes", **overrides) -> ExtractSettings:
    base = ExtractSettings(
        datasets=(DatasetSource(str(tmp_path / folder)),), store=str(tmp_path / "store"),
        shards=4, input_size=48, augment=1, cache_dir=cache_dir,
    )  # fmt: skip
    return replace(base, **overrides)


def _by_key(store: FeatureStore) -> dict[str, tuple[str, str]]:
    return {k: (r.sha256, r.input_fingerprint) for k, r in store.manifest.shards.items()}


def _consistent(store_root: str) -> None:
    report = VerifyReport()
    verify_store(StoreLayout.at(store_root), report)
    assert report.problems == [] and report.checked > 0


@pytest.mark.slow
def test_rerun_recomputes_only_changed_shards(tmp_path, cache_dir, ray_local, monkeypatch):
    make_dataset(tmp_path / "shapes", ("circles", "squares"), 16)
    settings = _settings(tmp_path, cache_dir)
    # One task submitted at a time, each read from the driver's disk when the last finishes.
    monkeypatch.setattr(workflows.extract.run, "submit_window", lambda: 1)
    (first,) = run_extract(settings)
    assert (first.shards_done, first.shards_skipped, first.rejects) == (8, 0, 0)
    store = FeatureStore.open(settings.store, "shapes", "efficientnet_lite0")
    assert store.manifest.is_complete() and len(first.nodes) == 1
    # Where the shards' seconds went: every stage timed, within the tasks' own seconds.
    assert set(first.stages) == set(STAGES) and first.commits == 8
    assert first.stages["runtime"] > 0 and first.stages["decode"] > 0 and first.stages["write"] > 0
    assert sum(first.stages.values()) <= first.task_seconds
    assert first.extract_started_at <= first.first_shard_at <= first.extract_started_at + 60
    before = _by_key(store)

    (again,) = run_extract(settings)
    assert (again.shards_done, again.shards_skipped) == (0, 8)

    make_dataset(tmp_path / "shapes", ("circles", "squares"), 17)  # one new image per class
    (third,) = run_extract(settings)
    after = _by_key(FeatureStore.open(settings.store, "shapes", "efficientnet_lite0"))
    changed = {k for k in after if after[k] != before[k]}
    assert 1 <= third.shards_done == len(changed) <= 2 and third.shards_skipped == 8 - len(changed)

    # A setting that alters features makes a new store: every shard redone, nothing mixed.
    (fourth,) = run_extract(replace(settings, augment=2))
    store = FeatureStore.open(settings.store, "shapes", "efficientnet_lite0")
    assert (fourth.shards_done, fourth.shards_skipped) == (8, 0)
    copies = store.read_table("train", ["copy"])["copy"].to_pylist()
    assert set(copies) == {0, 1, 2} and copies.count(0) * 3 == len(copies)

    # Fewer shards: the old part files go, the new ones are all the store has.
    (fifth,) = run_extract(replace(settings, augment=2, shards=2))
    assert fifth.shards_done == 4
    assert len(StoreLayout.at(settings.store).part_files("shapes", "efficientnet_lite0")) == 4
    _consistent(settings.store)


@pytest.mark.slow
def test_every_kind_of_awkward_file_is_used_or_quarantined_with_its_reason(
    tmp_path, cache_dir, ray_local
):
    expected = write_bad_input_corpus(tmp_path / "corpus")
    settings = _settings(
        tmp_path, cache_dir, "corpus", validation_fraction=0.0, augment=0, shards=2
    )
    (report,) = run_extract(settings)
    assert report.shards_failed == 0 and report.empty_classes == ()
    store = FeatureStore.open(settings.store, "corpus", "efficientnet_lite0")
    rejects = pq.read_table(store.layout.rejects_path("corpus", "efficientnet_lite0")).to_pylist()
    assert {r["path"]: r["reason"] for r in rejects} == {p: r for p, r in expected.items() if r}
    rows = store.read_table("train", ["path", "label"]).to_pylist()
    assert {r["path"] for r in rows} == {p for p, r in expected.items() if r is None}
    assert {r["label"] for r in rows} == {"good", "odd"}
    assert "good/caf\\xe9 latin1.jpg" in {r["path"] for r in rows}  # escaped, not lost
    manifest = json.loads(
        (tmp_path / "store" / "corpus" / "efficientnet_lite0" / "manifest.json").read_text()
    )
    assert "odd/unreadable.jpg" in json.dumps(manifest)
    _consistent(settings.store)


@pytest.mark.slow
def test_500_fuzzed_files_give_rows_or_rejects_and_no_dead_worker(tmp_path, cache_dir, ray_local):
    for index, (name, data) in enumerate(fuzzed_images(500, seed=1)):
        folder = tmp_path / "fuzz" / ("a", "b")[index % 2]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    settings = _settings(tmp_path, cache_dir, "fuzz", validation_fraction=0.0, augment=0,
                         shards=4, input_size=32)  # fmt: skip
    (report,) = run_extract(settings)
    assert report.shards_failed == 0 and report.failures == ()
    store = FeatureStore.open(settings.store, "fuzz", "efficientnet_lite0")
    rows = set(store.read_table("train", ["path"])["path"].to_pylist())
    rejected = {r.path for r in store.manifest.rejects}
    assert rows | rejected == {
        f"{('a', 'b')[i % 2]}/{n}" for i, (n, _) in enumerate(fuzzed_images(500, seed=1))
    }
    assert not rows & rejected and len(rows) > 20 and len(rejected) > 100


@pytest.mark.slow
def test_a_class_of_only_unusable_files_is_reported_or_dropped(tmp_path, cache_dir, ray_local):
    make_dataset(tmp_path / "shapes", ("circles", "squares", "triangles"), 6)
    for path in (tmp_path / "shapes" / "triangles").iterdir():
        path.write_bytes(b"not an image")
    settings = _settings(tmp_path, cache_dir, validation_fraction=0.0, augment=0, shards=2)
    (report,) = run_extract(settings)
    assert report.empty_classes == ("triangles",) and report.rejects == 6
    assert FeatureStore.open(settings.store, "shapes", "efficientnet_lite0").empty_classes() == [
        "triangles"
    ]
    (dropped,) = run_extract(replace(settings, drop_empty_classes=True))
    store = FeatureStore.open(settings.store, "shapes", "efficientnet_lite0")
    assert dropped.empty_classes == () and store.manifest.classes == ("circles", "squares")
    assert any("dropped classes" in w for w in dropped.warnings)


def _wf(*args, **popen):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "workflows.cli", *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)  # fmt: skip


@pytest.mark.slow
def test_two_writers_one_store_the_second_is_refused_then_waits(tmp_path, cache_dir, ray_local):
    make_dataset(tmp_path / "shapes", ("circles", "squares"), 24)
    store = tmp_path / "store"
    # The first run, slow on purpose (many augmented copies), in its own process and cluster.
    first = _wf("extract", str(tmp_path / "shapes"), "--store", str(store), "--shards", "4",
                "--image-size", "48", "--augment", "40", "--cache-dir", cache_dir,
                "--num-cpus", "1")  # fmt: skip
    commits = store / "shapes" / "efficientnet_lite0" / "_commits"
    deadline = time.time() + 300
    while not (commits.exists() and any(commits.rglob("*.json"))):  # its first shard is in
        assert first.poll() is None, first.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.2)
    second = _settings(tmp_path, cache_dir, augment=0)  # other settings: it would reset the store
    with pytest.raises(StoreBusyError, match=r"being written by wf extract on .* pass --wait"):
        run_extract(second)
    messages = []
    (report,) = run_extract(replace(second, wait=True), on_message=messages.append)
    assert first.wait(300) == 0 and messages and "held by" in messages[0]
    assert report.shards_done == 8  # it ran after the first, on a complete, consistent store
    _consistent(str(store))
    manifest = FeatureStore.open(str(store), "shapes", "efficientnet_lite0").manifest
    assert manifest.augment_copies == 0


@pytest.mark.slow
def test_what_a_killed_run_left_is_removed_by_the_next(tmp_path, cache_dir, ray_local):
    make_dataset(tmp_path / "shapes", ("circles", "squares"), 8)
    settings = _settings(tmp_path, cache_dir, shards=2)
    run_extract(settings)
    folder = tmp_path / "store" / "shapes" / "efficientnet_lite0"
    (folder / "train" / ".part-00000-of-00002-dead.parquet.tmp-0a1b").write_bytes(b"half")
    (folder / "train" / "part-00001-of-00002-0badc0ffee00.parquet").write_bytes(b"uncommitted")
    (folder / "_commits" / "someoldrun").mkdir(parents=True)
    (report,) = run_extract(settings)
    assert report.shards_done == 0
    assert sorted(p.name for p in (folder / "train").iterdir()) == sorted(
        Path(f).name
        for f in FeatureStore.open(settings.store, "shapes", "efficientnet_lite0").files("train")
    )
    assert not (folder / "_commits").exists()


@pytest.mark.slow
def test_int8_runtime_is_recorded_and_its_store_reused(tmp_path, cache_dir, ray_local):
    make_dataset(tmp_path / "shapes", ("circles", "squares"), 8)
    settings = _settings(tmp_path, cache_dir, runtime="litert-int8", calibration_images=6, shards=2)
    (first,) = run_extract(settings)
    manifest = FeatureStore.open(settings.store, "shapes", "efficientnet_lite0").manifest
    assert manifest.runtime == "litert-int8" and len(manifest.calibration) == 24
    assert first.rows > 0 and first.shards_failed == 0
    (again,) = run_extract(settings)  # the same calibration sample: nothing to redo
    assert again.shards_skipped == 4 and again.shards_done == 0
    (other,) = run_extract(replace(settings, calibration_images=5))  # another calibration set
    assert other.shards_done == 4
