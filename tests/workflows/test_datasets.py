import os

import pytest

from storage.errors import DatasetError, SettingsError
from storage.hashing import fingerprint
from tasks.extract_shard import IMAGES, Images
from tests.conftest import make_dataset
from workflows.datasets import discover_dataset, expand_dataset_paths, list_tree
from workflows.extract.config import load_config
from workflows.extract.settings import ExtractSettings


def test_split_folders_and_class_indices(tmp_path):
    make_dataset(tmp_path / "ds" / "train", ("cats", "dogs"), 4)
    make_dataset(tmp_path / "ds" / "val", ("cats", "dogs"), 2, seed=1)
    (tmp_path / "ds" / "train" / "cats" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "ds" / "train" / "Thumbs.db").write_bytes(b"junk")
    spec = discover_dataset(str(tmp_path / "ds"), 0.2)
    assert spec.classes == ("cats", "dogs") and spec.split_folders
    assert {s: len(items) for s, items in spec.images.items()} == {"train": 8, "validation": 4}
    assert {i.label_index for i in spec.images["train"] if i.label == "dogs"} == {1}
    assert all(".DS_Store" not in i.relative_path for i in spec.images["train"])
    assert spec.warnings == ()


def test_hash_split_is_deterministic_and_near_the_fraction(tmp_path):
    make_dataset(tmp_path / "ds", ("a", "b"), 60, size=16)
    first = discover_dataset(str(tmp_path / "ds"), 0.25)
    again = discover_dataset(str(tmp_path / "ds"), 0.25)
    assert first.images == again.images and first.fingerprint == again.fingerprint
    assert 15 <= len(first.images["validation"]) <= 45
    # Adding images never moves existing ones between splits.
    make_dataset(tmp_path / "ds", ("a", "b"), 80, size=16)
    more = discover_dataset(str(tmp_path / "ds"), 0.25)
    old_validation = {i.relative_path for i in first.images["validation"]}
    assert old_validation <= {i.relative_path for i in more.images["validation"]}


def test_dataset_mistakes_are_clear(tmp_path):
    make_dataset(tmp_path / "one", ("only",), 3)
    with pytest.raises(DatasetError, match="at least two class folders"):
        discover_dataset(str(tmp_path / "one"), 0.2)
    make_dataset(tmp_path / "empty", ("a", "b"), 3)
    (tmp_path / "empty" / "c").mkdir()
    with pytest.raises(DatasetError, match="'c' has no training images"):
        discover_dataset(str(tmp_path / "empty"), 0.2)
    make_dataset(tmp_path / "gap" / "train", ("a", "b"), 3)
    make_dataset(tmp_path / "gap" / "validation", ("a",), 3)
    spec = discover_dataset(str(tmp_path / "gap"), 0.2)
    assert any("'b' has no validation images" in w for w in spec.warnings)
    with pytest.raises(DatasetError, match="not a folder"):
        expand_dataset_paths([str(tmp_path / "missing")])
    with pytest.raises(DatasetError, match="name"):
        discover_dataset(str(tmp_path / "gap"), 0.2, name="bad/name")


def test_folder_of_datasets_expands(tmp_path):
    make_dataset(tmp_path / "all" / "shapes", ("a", "b"), 2)
    make_dataset(tmp_path / "all" / "split" / "train", ("a", "b"), 2)
    found = expand_dataset_paths([str(tmp_path / "all")])
    assert [root.split("/")[-1] for root, _ in found] == ["shapes", "split"]


def test_toml_config(tmp_path):
    config = tmp_path / "wf.toml"
    config.write_text(
        'shards = 3\naugment = 1\nbackbone = "vgg16"\n'
        "[augment_policy]\nrotation_degrees = 10\n"
        '[[datasets]]\npath = "data/a"\nname = "alpha"\nvalidation_fraction = 0.1\n'
    )
    values = load_config(str(config))
    settings = ExtractSettings(**values)
    assert settings.shards == 3 and settings.policy.rotation_degrees == 10
    assert settings.datasets[0].path == str(tmp_path / "data" / "a")
    assert settings.datasets[0].name == "alpha"
    config.write_text("shard = 3\n")
    with pytest.raises(SettingsError, match="unknown keys"):
        load_config(str(config))
    with pytest.raises(SettingsError, match="shards"):
        ExtractSettings(datasets=values["datasets"], shards=0)


def test_any_file_name_is_planned_escaped_and_symlinks_are_listed(tmp_path):
    import os

    make_dataset(tmp_path / "ds", ("a", "b"), 2, size=16)
    data = (tmp_path / "ds" / "a" / "a_0000.jpg").read_bytes()
    with open(os.path.join(os.fsencode(tmp_path / "ds" / "a"), b"caf\xe9.jpg"), "wb") as handle:
        handle.write(data)
    os.symlink("nowhere.jpg", tmp_path / "ds" / "b" / "dangling.jpg")
    (tmp_path / "ds" / "b" / "deep" / "er").mkdir(parents=True)
    (tmp_path / "ds" / "b" / "deep" / "er" / "x.jpg").write_bytes(data)
    spec = discover_dataset(str(tmp_path / "ds"), 0.0)
    paths = {i.relative_path for i in spec.images["train"]}
    assert {"a/caf\\xe9.jpg", "b/dangling.jpg", "b/deep/er/x.jpg"} <= paths
    item = next(i for i in spec.images["train"] if i.relative_path == "a/caf\\xe9.jpg")
    assert os.fsencode(item.path).endswith(b"caf\xe9.jpg") and item.size == len(data)
    assert spec.fingerprint == _canonical_fingerprint(spec)  # hashable whatever the names


def _canonical_fingerprint(spec) -> str:
    """The dataset fingerprint as wf computed it before the plan was columnar (one Python list):
    the streamed one must match it, or every store would be extracted again."""
    return fingerprint([list(spec.classes), {split: [[i.relative_path, i.size, i.mtime_ns]
                                                     for i in items]
                                             for split, items in spec.images.items()}])  # fmt: skip


def test_the_plan_is_columns_and_its_fingerprint_is_the_canonical_one(tmp_path):
    make_dataset(tmp_path / "ds" / "train", ("cats", "dogs", "émus"), 5)
    make_dataset(tmp_path / "ds" / "validation", ("cats", "dogs", "émus"), 2, seed=1)
    make_dataset(tmp_path / "ds" / "unlabelled", ("u",), 3, seed=2)
    (tmp_path / "ds" / "train" / "dogs" / "back\\slash.jpg").write_bytes(b"x")
    (tmp_path / "ds" / "train" / "cats").joinpath(os.fsdecode(b"caf\xe9.jpg")).write_bytes(b"y")
    spec = discover_dataset(str(tmp_path / "ds"), 0.2)
    train = spec.images["train"]
    assert isinstance(train, Images) and train.table.schema == IMAGES and len(train) == 17
    # No column holds the root: each path is the root and the relative path, the listing's own.
    listed = {e.path for e in list_tree(str(tmp_path / "ds")).files}
    planned = [i.path for images in spec.images.values() for i in images]
    assert len(planned) == len(set(planned)) == len(listed) and set(planned) == listed
    assert os.fsdecode(str(tmp_path / "ds/train/cats").encode() + b"/caf\xe9.jpg") in planned
    assert [i.label_index for i in train] == sorted(i.label_index for i in train)  # by class
    assert "train/dogs/back\\\\slash.jpg" in set(train.relative_paths())  # escaped
    assert {i.label for i in train} == {"cats", "dogs", "émus"}
    assert all(i.mtime_ns > 0 and i.size > 0 for i in train)
    assert spec.fingerprint == _canonical_fingerprint(spec)
    assert Images.of(train, train.labels, train.root) == train  # objects and columns agree
    for images in spec.images.values():  # what a shard's fingerprint hashes, from the columns
        rows = [[i.relative_path, i.size, i.mtime_ns, i.label] for i in images]
        assert list(images.signature_rows()) == rows
    assert train.table.column("path").null_count == len(train)  # no path is held: all derived
    # A path that is not the root and the relative path (an object key "a//b") is held as is.
    elsewhere = Images.of(train, train.labels, str(tmp_path / "elsewhere"))
    assert [i.path for i in elsewhere] == [i.path for i in train]
    assert elsewhere.table.column("path").null_count == 0
    # Dropping a class re-indexes the others; the unlabelled keep -1.
    kept = train.relabel(("cats", "émus"))
    assert {(i.label, i.label_index) for i in kept} == {("cats", 0), ("émus", 1)}
    assert len(kept) == 11
    assert {i.label_index for i in spec.images["unlabelled"].relabel(("cats",))} == {-1}


def test_unlabelled_images_are_their_own_split_and_unused_folders_are_named(tmp_path):
    make_dataset(tmp_path / "ds" / "train", ("cats", "dogs"), 3)
    make_dataset(tmp_path / "ds" / "validation", ("cats", "dogs"), 2, seed=1)
    make_dataset(tmp_path / "ds" / "unlabelled" / "batch1", ("x", "y"), 2, seed=2)  # any depth
    make_dataset(tmp_path / "ds" / "tset", ("cats", "dogs"), 1, seed=3)  # a misspelt split
    (tmp_path / "ds" / "notes.txt").write_text("loose")
    spec = discover_dataset(str(tmp_path / "ds"), 0.2)
    assert spec.classes == ("cats", "dogs")
    pool = spec.images["unlabelled"]
    assert (
        len(pool) == 4 and {i.label for i in pool} == {""} and {i.label_index for i in pool} == {-1}
    )
    assert all(i.relative_path.startswith("unlabelled/batch1/") for i in pool)
    assert any(
        "tset/" in w and "not train, validation, test or unlabelled" in w for w in spec.warnings
    )
    assert any("1 files outside split folders" in w for w in spec.warnings)
    # Beside class folders (no splits) the American spelling is the pool too, not a class.
    make_dataset(tmp_path / "flat", ("a", "b"), 4)
    make_dataset(tmp_path / "flat" / "unlabeled", ("u",), 3, seed=4)
    flat = discover_dataset(str(tmp_path / "flat"), 0.25)
    assert flat.classes == ("a", "b") and len(flat.images["unlabelled"]) == 3
    assert flat.fingerprint != discover_dataset(str(tmp_path / "ds"), 0.2).fingerprint
    # A folder with nothing but unlabelled images is no dataset.
    make_dataset(tmp_path / "only" / "unlabelled", ("u",), 2)
    with pytest.raises(DatasetError, match="holds no images in class folders"):
        expand_dataset_paths([str(tmp_path / "only")])


def _streamed_dataset(root):
    """Split folders, nested class folders beside their files, a class name that is another's
    prefix (its keys sort apart from its place among the classes), loose files and a pool."""
    for split, n in (("train", 9), ("validation", 4)):
        for cls in ("a", "a-b", "cats"):
            make_dataset(root / split, (cls,), n, seed=len(cls) + n)
            make_dataset(root / split / cls / "deep", ("er",), 2, seed=3)
    (root / "train" / "loose.jpg").write_bytes(b"x")
    make_dataset(root / "unlabelled", ("sub",), 6, seed=4)
    (root / "unlabelled" / "Zed.jpg").write_bytes(b"z")


@pytest.mark.parametrize("shards", [1, 3, 7])
def test_planning_streams_a_batch_at_a_time_and_cuts_the_shards_the_list_would(
    tmp_path, monkeypatch, shards
):
    """The listing is spilled 5 rows at a time and the planned images 4 at a time, into 2
    files a split, and the sorted shards merged 2 at a time in rounds: the splits, the
    fingerprint and every shard are what the whole list in memory gives (``plan_shards``, the
    dataset's canonical fingerprint)."""
    import workflows.dataset_listing
    import workflows.planned
    from workflows.extract.plan import plan_shards

    _streamed_dataset(tmp_path / "ds")
    whole = discover_dataset(str(tmp_path / "ds"), 0.2, shards=shards)
    monkeypatch.setattr(workflows.dataset_listing, "SPILL_ROWS", 5)
    monkeypatch.setattr(workflows.planned, "BUFFER_ROWS", 4)
    monkeypatch.setattr(workflows.planned, "GROUPS", 2)  # shards share spill files
    monkeypatch.setattr(workflows.planned, "MERGE_FAN_IN", 2)  # merged in rounds
    monkeypatch.setattr(workflows.planned, "MERGE_ROWS", 2)
    monkeypatch.setattr(workflows.planned, "MERGE_MIN_BATCH", 2)
    spec = discover_dataset(str(tmp_path / "ds"), 0.2, shards=shards)
    assert spec.images == whole.images and spec.warnings == whole.warnings
    assert spec.fingerprint == whole.fingerprint == _canonical_fingerprint(spec)
    train = spec.images["train"]
    assert len(train) == 3 * 11 and [i.label for i in train][:11] == ["a"] * 11
    # within a class, as listed: each folder's files, then its folders'
    assert [i.relative_path for i in train][9:11] == ["train/a/deep/er/er_0000.jpg",
                                                     "train/a/deep/er/er_0001.jpg"]  # fmt: skip
    pool = [i.relative_path for i in spec.images["unlabelled"]]
    assert pool == sorted(pool) and len(pool) == 7
    for split, items in spec.images.items():
        for index, expected in enumerate(plan_shards(items, shards)):
            ref = spec.shard(split, index)
            assert len(ref) == len(expected) and ref.load() == expected


def test_a_dropped_class_leaves_the_planned_shards_as_they_are_read(tmp_path):
    from workflows.extract.run import without_classes

    _streamed_dataset(tmp_path / "ds")
    spec = discover_dataset(str(tmp_path / "ds"), 0.2, shards=3)
    fewer = without_classes(spec, {"a-b"})
    assert fewer.classes == ("a", "cats") and fewer.fingerprint == _canonical_fingerprint(fewer)
    for split in fewer.splits:
        expected = spec.images[split].relabel(fewer.classes) if split != "unlabelled" else None
        loaded = [fewer.shard(split, k).load() for k in range(3)]
        assert fewer.split_size(split) == sum(len(s) for s in loaded)
        if expected is not None:
            assert fewer.images[split] == expected
            assert sorted(i.relative_path for s in loaded for i in s) == sorted(
                expected.relative_paths()
            )
            assert {i.label for s in loaded for i in s} == {"a", "cats"}


def test_the_spills_go_with_the_plan(tmp_path):
    import gc

    _streamed_dataset(tmp_path / "ds")
    found = expand_dataset_paths([str(tmp_path / "ds")])
    listing = found[0][1]
    spec = discover_dataset(str(tmp_path / "ds"), 0.2, tree=listing, shards=2)
    ref = spec.shard("train", 1)
    folders = [os.path.dirname(listing.spill), os.path.dirname(ref.path)]
    assert all(os.path.isdir(f) for f in folders)
    del found, listing, spec
    gc.collect()
    assert not any(os.path.exists(f) for f in folders)
