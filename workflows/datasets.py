"""Finding datasets and their images: classes, splits and files, listed once.

A dataset is a folder (a local path or an object-store URI) with one sub-folder per class. It
may hold split folders (``train/``, ``validation/`` and optionally ``test/``; ``val`` and
``valid`` are read as ``validation``), each with the class folders. Without them, each image
goes to validation when a stable hash of its relative path falls under the validation fraction,
so the split never changes between runs or machines. Classes are the sorted folder names, the
same indices for every split; files in sub-folders of a class belong to that class.

A folder ``unlabelled/`` (or ``unlabeled/``) beside the split folders (or beside the class
folders of a dataset without splits) holds images nobody has labelled yet, at any depth: they
are the split ``unlabelled``, with no class (label ``""``, index -1), read only by
``wf suggest``. Any other folder or file wf does not use is named in a warning, so a misspelt
split (``tset/``) is never skipped in silence.

The driver only lists: each file's size and modification time stand for its content in the
plan (as ``make`` does), and the shard tasks read the bytes where they are.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from storage.errors import DatasetError
from storage.filesystem import (
    LISTING,
    Location,
    TreeFile,
    column_rows,
    os_bytes,
    os_name,
)
from storage.hashing import canonical_json, stable_bucket, stable_unit_interval, update_with_rows
from storage.names import escape_name
from tasks.extract_shard import Images
from tasks.images import is_ignored_file
from workflows.dataset_listing import Listing, list_folder
from workflows.planned import PLANNED, PlannedImages, ShardRef

SPLITS = ("train", "validation", "test")
UNLABELLED = "unlabelled"  # the split of images with no class yet
UNLABELLED_FOLDERS = ("unlabelled", "unlabeled")
NO_LABEL, NO_LABEL_INDEX = "", -1
SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation",
                 "valid": "validation", "test": "test"}  # fmt: skip
_SPLIT_SALT = "wf-validation-split"
SHARD_SALT = "wf-shard"  # shard_numbers' salt
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True, eq=False)
class Tree:
    """Everything under a folder, listed once: files (as the columns of
    :data:`storage.filesystem.LISTING`) and folders, hidden names left out."""

    location: Location
    listing: pa.Table
    folders: frozenset[tuple[str, ...]]

    @property
    def files(self) -> list[TreeFile]:
        """The files as objects, for folders a person names (not a dataset being planned)."""
        files = []
        for parts, path, size, mtime in column_rows(self.listing, LISTING.names):
            names = tuple(os_name(p) for p in parts)
            where = self.location.path(*names) if path is None else os_name(path)
            files.append(TreeFile(names, where, size, mtime))
        return files

    def sub(self, name: str) -> Tree:
        location = self.location
        inside = Location(location.filesystem, location.path(name), f"{location.uri}/{name}")
        listing = self.listing.filter(self.under(name).to_numpy(zero_copy_only=False)
                                      & (self.depths() > 1))  # fmt: skip
        below = pc.list_slice(listing.column("parts"), 1).cast(LISTING.field("parts").type)
        folders = frozenset(f[1:] for f in self.folders if f[0] == name and len(f) > 1)
        return Tree(inside, listing.set_column(0, "parts", below), folders)

    def children(self) -> list[str]:
        return sorted({f[0] for f in self.folders})

    def depths(self) -> np.ndarray:
        """Each file's number of parts below the folder."""
        return pc.list_value_length(self.listing.column("parts")).to_numpy()

    def under(self, name: str) -> pa.ChunkedArray:
        """Whether each file's first part below the folder is ``name``."""
        first = pc.list_element(self.listing.column("parts"), 0)
        return pc.equal(first, pa.scalar(os_bytes(name)))


def list_tree(where: str) -> Tree:
    """The files and folders under ``where``, or :class:`DatasetError` when it is no folder."""
    location = Location.at(where)
    if location.kind() != "folder":  # file_info retries a store that stops answering
        raise DatasetError(f"{where} is not a folder")
    files, folders = location.tree(is_ignored_file)
    return Tree(location, files, frozenset(folders))


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    root: str  # the path or URI the images are read from
    source: pafs.FileSystem
    classes: tuple[str, ...]
    planned: PlannedImages  # by split and shard; each image's size and time stand for its content
    split_folders: bool
    warnings: tuple[str, ...]

    @property
    def splits(self) -> tuple[str, ...]:
        return self.planned.splits

    def _classes(self, split: str) -> tuple[str, ...] | None:
        """The classes a split's images are indexed by: the spec's (fewer than the folders'
        when some were dropped), or none to change for the unlabelled images."""
        return None if split == UNLABELLED else self.classes

    def shard(self, split: str, shard: int) -> ShardRef:
        """The images of one shard of ``split``, as a reference that loads them."""
        return self.planned.shard(split, shard, self._classes(split))

    def split_size(self, split: str) -> int:
        return self.planned.split_size(split, self._classes(split))

    @property
    def images(self) -> dict[str, Images]:
        """Every split's images in memory, in order: for small datasets and tests (planning
        reads them a shard at a time)."""
        return {split: self.planned.images(split, self._classes(split)) for split in self.splits}

    @property
    def fingerprint(self) -> str:
        """:func:`storage.hashing.fingerprint` of ``[classes, {split: [[path, size, mtime],
        ...]}]``, each split's images by class then in listing order (a local folder's walk, an
        object store's keys; unlabelled ones by path), streamed from the planned shards a few
        thousand rows at a time."""
        digest = hashlib.sha256()
        digest.update(f"[{canonical_json(list(self.classes))},{{".encode())
        for n, split in enumerate(sorted(self.splits)):
            digest.update(f"{',' if n else ''}{canonical_json(split)}:[".encode())
            update_with_rows(digest, self._signature_rows(split))
            digest.update(b"]")
        digest.update(b"}]")
        return digest.hexdigest()

    def _signature_rows(self, split: str) -> Iterator[tuple]:
        for chunk in self.planned.merged(split, self._classes(split)):
            yield from column_rows(chunk, ["relative_path", "size", "mtime_ns"])


def shard_numbers(relative_paths: Iterable[str], count: int, shards: int) -> np.ndarray:
    """Each image's shard among ``shards``: a stable hash of its relative path, so adding
    images never moves an existing one to another shard."""
    return np.fromiter((stable_bucket(r, shards, SHARD_SALT) for r in relative_paths), np.int64,
                       count=count)  # fmt: skip


def _split_folders(tree: Tree | Listing) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in tree.children():
        split = SPLIT_ALIASES.get(name.lower())
        if name.lower() in UNLABELLED_FOLDERS:
            split = UNLABELLED
        if split:
            if split in found:
                raise DatasetError(
                    f"{tree.location.uri}: both {found[split]}/ and {name}/ are {split} folders"
                )
            found[split] = name
    return found


def is_dataset(tree: Listing) -> bool:
    """A dataset has split folders, or at least one class folder that directly holds files."""
    splits = _split_folders(tree)
    if set(splits) - {UNLABELLED}:
        return True
    pool = splits.get(UNLABELLED)
    return any(n and len(k) == 1 and k[0] != pool for k, n in tree.direct.items())


def expand_dataset_paths(paths: list[str]) -> list[tuple[str, Listing]]:
    """Each path as a dataset, or, for a folder of datasets, each dataset in it: listed once,
    each dataset's listing a view of its folder's."""
    found: list[tuple[str, Listing]] = []
    for path in paths:
        tree = list_folder(path)
        if is_dataset(tree):
            found.append((tree.location.uri, tree))
            continue
        children = [tree.sub(n) for n in tree.children() if n.lower() not in UNLABELLED_FOLDERS]
        children = [child for child in children if is_dataset(child)]
        if not children:
            raise DatasetError(
                f"{path} holds no images in class folders (expected DATASET/CLASS/IMAGE, "
                "DATASET/SPLIT/CLASS/IMAGE or a folder of such datasets)"
            )
        found.extend((child.location.uri, child) for child in children)
    return found


def discover_dataset(
    root: str, validation_fraction: float, name: str | None = None, tree: Listing | None = None,
    shards: int = 1,
) -> DatasetSpec:  # fmt: skip
    """Classes, splits and images of the dataset at ``root``, or a :class:`DatasetError`; its
    images planned into ``shards`` shards of each split as they are read from the listing."""
    tree = tree or list_folder(root)
    location = tree.location
    name = name or posixpath.basename(location.root.rstrip("/")) or "dataset"
    if not _NAME.match(name):
        raise DatasetError(f"dataset name {name!r} must be letters, digits, '.', '_' or '-'")
    warnings: list[str] = []
    split_dirs = _split_folders(tree)
    pool = split_dirs.pop(UNLABELLED, None)
    folders = {f for f in tree.folders if f[0] != pool}
    # Classes come from the folders alone, before a row is read.
    if split_dirs:
        if "train" not in split_dirs:
            raise DatasetError(f"{name}: has {', '.join(split_dirs)} folders but no train/ folder")
        unused = sorted({f[0] for f in folders} - set(split_dirs.values()))
        if unused:
            warnings.append(
                f"{name}: ignored folder{'s' if len(unused) > 1 else ''} "
                f"{', '.join(escape_name(u) + '/' for u in unused)} (not train, validation, "
                "test or unlabelled)"
            )
        if tree.loose_files():
            warnings.append(f"{name}: ignored {tree.loose_files()} files outside split folders")
        found = {f[1] for f in folders if f[0] in split_dirs.values() and len(f) > 1}
    else:
        found = {f[0] for f in folders}
    classes = tuple(sorted(found))
    if len(classes) < 2:
        found_text = f"only {escape_name(classes[0])!r}" if classes else "none"
        raise DatasetError(
            f"{name}: a classifier needs at least two class folders, found {found_text}"
        )
    labels = tuple(escape_name(c) for c in classes)
    for split, folder in split_dirs.items() if split_dirs else [(None, None)]:
        loose = tree.loose_files(folder) if folder else tree.loose_files()
        if loose:
            where = f"{name}/{split}" if split else name
            warnings.append(f"{where}: ignored {loose} files outside class folders")
    splits = tuple(s for s in SPLITS if s in split_dirs) if split_dirs else SPLITS[:2]
    planned = PlannedImages(labels, location.root, (*splits, *([UNLABELLED] * (pool is not None))),
                            shards)  # fmt: skip
    plan = _Planner(planned, pa.array([os_bytes(c) for c in classes], pa.binary()), shards)
    try:
        _plan_rows(tree, plan, split_dirs, pool, validation_fraction)
    finally:
        planned.close()
    counts = {split: planned.class_counts(split) for split in splits}
    for index, label in enumerate(labels):
        if not counts["train"][index]:
            raise DatasetError(f"{name}: class {label!r} has no training images")
        for split in splits:
            if split != "train" and not counts[split][index]:
                warnings.append(f"{name}: class {label!r} has no {split} images")
    return DatasetSpec(
        name, location.uri, location.filesystem, labels, planned, bool(split_dirs),
        tuple(warnings),
    )  # fmt: skip


def _plan_rows(
    tree: Listing, plan: _Planner, split_dirs: dict[str, str], pool: str | None, fraction: float
) -> None:
    """Every listed file of the dataset to its split (or none), a spill batch at a time."""
    for batch in tree.rows():
        parts, first = batch.column("parts"), pc.list_element(batch.column("parts"), 0)
        depth = pc.list_value_length(parts)
        if split_dirs:  # SPLIT/CLASS/.../IMAGE
            for split, folder in split_dirs.items():
                inside = pc.and_(pc.equal(first, pa.scalar(os_bytes(folder))),
                                 pc.greater(depth, 2))  # fmt: skip
                plan.add(split, batch.filter(inside), 1)
        else:  # CLASS/.../IMAGE, to validation by a stable hash of its path
            inside = pc.greater(depth, 1)
            if pool is not None:
                inside = pc.and_(inside, pc.not_equal(first, pa.scalar(os_bytes(pool))))
            rows, relative = plan.rows(batch.filter(inside), 0)
            held_out = np.fromiter(
                (stable_unit_interval(r, _SPLIT_SALT) < fraction
                 for r in relative.to_pylist()), bool, count=len(relative),
            )  # fmt: skip
            plan.put("train", rows.filter(pa.array(~held_out)), relative.filter(~held_out))
            plan.put("validation", rows.filter(pa.array(held_out)), relative.filter(held_out))
        if pool is not None:  # UNLABELLED/.../IMAGE, at any depth, by path
            inside = pc.and_(pc.equal(first, pa.scalar(os_bytes(pool))), pc.greater(depth, 1))
            plan.add(UNLABELLED, batch.filter(inside), None)


class _Planner:
    """Listed rows of one dataset made planned images (:data:`workflows.planned.PLANNED`) and
    handed to their shards."""

    def __init__(self, planned: PlannedImages, known: pa.Array, shards: int) -> None:
        self.planned, self.known, self.shards = planned, known, shards

    def rows(self, listed: pa.RecordBatch, class_part: int | None) -> tuple[pa.Table, pa.Array]:
        """The planned images of ``listed`` (their class the name at ``class_part`` of their
        parts, or none) and their relative paths."""
        parts = listed.column("parts")
        relative = _relative_paths(parts)
        if (
            class_part is None
        ):  # unlabelled: sorted by path, then (keys that are one path) as listed
            index = pa.array(np.full(len(listed), NO_LABEL_INDEX, np.int32))
            order = pc.binary_join_element_wise(relative.cast(pa.binary()),
                                                listed.column("order"), b"\0")  # fmt: skip
        else:
            index = pc.index_in(pc.list_element(parts, class_part), value_set=self.known)
            order = listed.column("order")
        table = pa.table({
            "path": listed.column("path"),  # null where it is the root and the relative path
            "relative_path": relative, "size": listed.column("size"),
            "mtime_ns": listed.column("mtime_ns"), "label_index": index.cast(pa.int32()),
            "order": order,
        }, schema=PLANNED)  # fmt: skip
        return table, relative

    def put(self, split: str, rows: pa.Table, relative: pa.Array) -> None:
        if not rows.num_rows:
            return
        shards = shard_numbers(relative.to_pylist(), len(relative), self.shards)
        self.planned.add(split, rows, shards)

    def add(self, split: str, listed: pa.RecordBatch, class_part: int | None) -> None:
        if listed.num_rows:
            self.put(split, *self.rows(listed, class_part))


def _relative_paths(parts: pa.Array) -> pa.Array:
    """Each file's parts joined by ``/``, escaped (:func:`storage.names.escape_name`): as they
    are where the names are UTF-8 without a backslash, else a name at a time."""
    joined = pc.binary_join(parts, b"/")
    try:
        text = joined.cast(pa.string())
        plain = not pc.any(pc.match_substring(text, "\\")).as_py()
    except pa.ArrowInvalid:  # not UTF-8
        plain = False
    if not plain:
        text = pa.array([escape_name(os_name(b)) for b in joined.to_pylist()], pa.string())
    return text
