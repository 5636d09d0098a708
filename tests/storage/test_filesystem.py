"""Atomic writes, temporary files of killed runs, retries, and locations that cannot be used."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from storage.errors import StoreError
from storage.filesystem import (
    Location,
    RetryPolicy,
    list_files,
    read_bytes,
    remove_temporaries,
    retrying,
    write_bytes,
    write_stream,
)
from workflows.datasets import Tree


def test_a_failed_write_leaves_neither_the_file_nor_its_temporary(tmp_path):
    fs = pafs.LocalFileSystem()

    def broken(stream):
        stream.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_stream(fs, str(tmp_path / "a" / "f.bin"), broken)
    assert os.listdir(tmp_path / "a") == []
    write_bytes(fs, str(tmp_path / "a" / "f.bin"), b"whole")
    assert read_bytes(fs, str(tmp_path / "a" / "f.bin")) == b"whole"


def test_temporaries_of_killed_runs_are_removed(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / ".part-00000-of-00001-x.parquet.tmp-0123").write_bytes(b"x")
    (tmp_path / "train" / "part-00000-of-00001-x.parquet").write_bytes(b"x")
    assert remove_temporaries(pafs.LocalFileSystem(), str(tmp_path)) == 1
    assert os.listdir(tmp_path / "train") == ["part-00000-of-00001-x.parquet"]


@pytest.mark.parametrize("where", ["file", "under_file", "proc"])
def test_an_unwritable_store_is_one_line(tmp_path, where):
    (tmp_path / "afile").write_text("x")
    path = {"file": tmp_path / "afile", "under_file": tmp_path / "afile" / "store",
            # /proc refuses new folders even to root: a read-only place on any Linux machine.
            "proc": "/proc/wf-store"}[where]  # fmt: skip
    with pytest.raises(StoreError, match="cannot write to") as caught:
        Location.at(str(path)).ensure_writable()
    assert "\n" not in str(caught.value)


def test_transient_object_store_errors_are_retried_then_one_line():
    calls = []

    remote = pafs.SubTreeFileSystem("/", pafs.LocalFileSystem())  # not local: retries apply

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7")
        return "ok"

    assert retrying(remote, flaky, RetryPolicy(5, 0.01, 0.02)) == "ok" and len(calls) == 3

    def down():
        raise OSError("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7,\nmore")

    with pytest.raises(StoreError, match="did not answer after 3 tries") as caught:
        retrying(remote, down, RetryPolicy(3, 0.01, 0.02))
    assert "\n" not in str(caught.value)

    def denied():
        raise OSError("AWS Error ACCESS_DENIED during PutObject operation")

    with pytest.raises(OSError, match="ACCESS_DENIED"):  # not transient: no retry
        retrying(remote, denied, RetryPolicy(3, 0.01, 0.02))


@pytest.fixture(scope="module")
def s3():
    from tests.s3 import S3Server

    server = S3Server()
    server.create_bucket("listing")
    yield server
    server.close()


def test_listing_an_object_store_by_prefix_in_parallel_finds_what_one_listing_finds(s3):
    fs = s3.filesystem()
    keys = ["loose.txt", "train/a/1.jpg", "train/a/2.jpg", "train/b/deep/3.jpg",
            "validation/a/4.jpg", "validation/only.jpg", "unlabelled/x/y/z/5.jpg"]  # fmt: skip
    keys += [f"wide/p{i:02d}/{j}.jpg" for i in range(20) for j in range(3)]  # more than threads
    for key in keys:
        with fs.open_output_stream(f"listing/root/{key}") as out:
            out.write(b"wf")
    serial = [(i.path, i.size) for i in list_files(fs, "listing/root")]
    for threads in (2, 4, 16):
        assert [(i.path, i.size) for i in list_files(fs, "listing/root", threads=threads)] == serial
    assert len(serial) == len(keys)
    assert list_files(fs, "listing/nothing/here", threads=4) == []
    files, folders = Location(fs, "listing/root", "s3://listing/root").tree(lambda name: False)
    parts = [tuple(p.decode() for p in f) for f in files.column("parts").to_pylist()]
    assert sorted(parts) == sorted(tuple(k.split("/")) for k in keys)
    joined = [b"/".join(p) for p in files.column("parts").to_pylist()]
    assert joined == sorted(joined) and files.column("size").to_pylist() == [2] * len(keys)
    # Each path is the root and the parts: none is held.
    assert files.column("path").null_count == len(keys)
    assert ("train", "b", "deep") in folders and ("wide", "p19") in folders


def test_an_object_key_its_parts_do_not_spell_keeps_its_own_path(s3):
    fs = s3.filesystem()
    for key in ("a/./z.jpg", "a/b.jpg"):
        s3.client().put_object(Bucket="listing", Key=f"odd/{key}", Body=b"wf")
    listed = [i.path for i in list_files(fs, "listing/odd")]
    location = Location(fs, "listing/odd", "s3://listing/odd")
    files, folders = location.tree(lambda name: False)
    assert files.column("path").null_count == 1  # a/b.jpg
    tree = Tree(location, files, frozenset(folders))
    # Each where it is, in the keys' order ("a/./z" before "a/b", though its parts say a/z):
    # the order the shards' fingerprints were computed in before.
    assert [f.path for f in tree.files] == sorted(listed) and len(listed) == 2
    assert [f.parts for f in tree.files] == [("a", "z.jpg"), ("a", "b.jpg")]


def test_a_local_tree_lists_files_and_folders_in_one_walk_skipping_ignored_names(tmp_path):
    for name in ("train/a/1.jpg", "train/b/deep/2.jpg", "train/.hidden/3.jpg", "4.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"wf")
    (tmp_path / "validation" / "empty").mkdir(parents=True)  # no file: still a folder
    location = Location(pafs.LocalFileSystem(), str(tmp_path), str(tmp_path))
    files, folders = location.tree(lambda name: name.startswith("."))
    parts = [tuple(p.decode() for p in f) for f in files.column("parts").to_pylist()]
    assert parts == [("4.jpg",), ("train", "a", "1.jpg"), ("train", "b", "deep", "2.jpg")]
    assert folders == {("train",), ("train", "a"), ("train", "b"), ("train", "b", "deep"),
                       ("validation",), ("validation", "empty")}  # fmt: skip


def test_pyarrow_is_spared_the_pandas_import_and_pandas_still_works_when_asked_for():
    script = """
import sys
from storage.filesystem import ColumnBuilder, LISTING, skip_pandas_probe
skip_pandas_probe()
import pyarrow as pa
rows = ColumnBuilder(LISTING)
rows.append([b"a", b"b.jpg"], None, 1, 2)
table = rows.table()
assert table.column("size").to_pylist() == [1] and pa.scalar(3).as_py() == 3
print("pandas" in sys.modules)
print(type(table.select(["size"]).to_pandas()).__name__, "pandas" in sys.modules)
import pandas as pd  # a conversion that required pandas put pyarrow's pandas checks right
print(pa.types.is_dictionary(pa.array(pd.Series(pd.Categorical(["x"]))).type))
"""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, cwd=root)  # fmt: skip
    assert done.stdout.split() == ["False", "DataFrame", "True", "True"]
