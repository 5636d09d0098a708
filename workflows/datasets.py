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
from storage.hashing import canonical_json, stable_unit_interval, update_with_rows
from storage.names import escape_name
from tasks.extract_shard import IMAGES, Images
from tasks.images import is_ignored_file

SPLITS = ("train", "validation", "test")
UNLABELLED = "unlabelled"  # the split of images with no class yet
UNLABELLED_FOLDERS = ("unlabelled", "unlabeled")
NO_LABEL, NO_LABEL_INDEX = "", -1
SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation",
                 "valid": "validation", "test": "test"}  # fmt: skip
_SPLIT_SALT = "wf-validation-split"
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

    def first_parts(self) -> pa.ChunkedArray:
        """Each file's first part below the folder (its own name for a loose file)."""
        return pc.list_element(self.listing.column("parts"), 0)

    def under(self, name: str) -> pa.ChunkedArray:
        """Whether each file's first part below the folder is ``name``."""
        return pc.equal(self.first_parts(), pa.scalar(os_bytes(name)))

    def loose_files(self) -> int:
        """How many files lie directly in the folder."""
        return int((self.depths() == 1).sum())


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
    images: dict[str, Images]  # by split; each image's size and time stand for its content
    split_folders: bool
    warnings: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        """:func:`storage.hashing.fingerprint` of ``[classes, {split: [[path, size, mtime],
        ...]}]``, streamed a few thousand rows at a time rather than built as one Python list."""
        digest = hashlib.sha256()
        digest.update(f"[{canonical_json(list(self.classes))},{{".encode())
        for n, split in enumerate(sorted(self.images)):
            digest.update(f"{',' if n else ''}{canonical_json(split)}:[".encode())
            rows = column_rows(self.images[split].table, ["relative_path", "size", "mtime_ns"])
            update_with_rows(digest, rows)
            digest.update(b"]")
        digest.update(b"}]")
        return digest.hexdigest()


def _split_folders(tree: Tree) -> dict[str, str]:
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


def is_dataset(tree: Tree) -> bool:
    """A dataset has split folders, or at least one class folder that directly holds files."""
    splits = _split_folders(tree)
    if set(splits) - {UNLABELLED}:
        return True
    in_class = tree.depths() == 2
    if UNLABELLED in splits:
        in_class &= ~tree.under(splits[UNLABELLED]).to_numpy(zero_copy_only=False)
    return bool(in_class.any())


def expand_dataset_paths(paths: list[str]) -> list[tuple[str, Tree]]:
    """Each path as a dataset, or, for a folder of datasets, each dataset in it."""
    found: list[tuple[str, Tree]] = []
    for path in paths:
        tree = list_tree(path)
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


def _by_class(tree: Tree, where: str, warnings: list[str]) -> Tree:
    """A tree of the files in the class folders of ``tree`` (the class first)."""
    loose = tree.loose_files()
    if not loose:
        return tree
    warnings.append(f"{where}: ignored {loose} files outside class folders")
    in_class = tree.listing.filter(pa.array(tree.depths() > 1))
    return Tree(tree.location, in_class, tree.folders)


def discover_dataset(
    root: str, validation_fraction: float, name: str | None = None, tree: Tree | None = None
) -> DatasetSpec:
    """Classes, splits and images of the dataset at ``root``, or a :class:`DatasetError`."""
    tree = tree or list_tree(root)
    listed = tree
    location = tree.location
    name = name or posixpath.basename(location.root.rstrip("/")) or "dataset"
    if not _NAME.match(name):
        raise DatasetError(f"dataset name {name!r} must be letters, digits, '.', '_' or '-'")
    warnings: list[str] = []
    split_dirs = _split_folders(tree)
    pool = split_dirs.pop(UNLABELLED, None)
    if pool is not None:
        tree = _without(tree, pool)
    # Classes come from the folders alone; each split's images are then made from its files and
    # its listing let go before the next split's (the listing's copies were the plan's peak).
    if split_dirs:
        if "train" not in split_dirs:
            raise DatasetError(f"{name}: has {', '.join(split_dirs)} folders but no train/ folder")
        unused = [c for c in tree.children() if c not in split_dirs.values()]
        if unused:
            warnings.append(
                f"{name}: ignored folder{'s' if len(unused) > 1 else ''} "
                f"{', '.join(escape_name(u) + '/' for u in unused)} (not train, validation, "
                "test or unlabelled)"
            )
        if tree.loose_files():
            warnings.append(f"{name}: ignored {tree.loose_files()} files outside split folders")
        found = {f[1] for f in tree.folders if f[0] in split_dirs.values() and len(f) > 1}
    else:
        found = set(tree.children())
    classes = tuple(sorted(found))
    if len(classes) < 2:
        found_text = f"only {escape_name(classes[0])!r}" if classes else "none"
        raise DatasetError(
            f"{name}: a classifier needs at least two class folders, found {found_text}"
        )
    labels = tuple(escape_name(c) for c in classes)
    known = pa.array([os_bytes(c) for c in classes], pa.binary())

    def planned(files: Tree, prefix: str) -> Images:
        index = (pc.index_in(files.first_parts(), value_set=known)
                 .to_numpy(zero_copy_only=False).astype(np.int32))  # fmt: skip
        return _images(files, _relative_paths(prefix, files), index, labels, location.root)

    images: dict[str, Images] = {}
    if split_dirs:
        for split, folder in split_dirs.items():
            images[split] = planned(_by_class(tree.sub(folder), f"{name}/{split}", warnings),
                                    f"{folder}/")  # fmt: skip
    else:
        whole = planned(_by_class(tree, name, warnings), "")
        held_out = np.fromiter(
            (stable_unit_interval(r, _SPLIT_SALT) < validation_fraction
             for r in whole.relative_paths()), bool, count=len(whole),
        )  # fmt: skip
        images = {"train": whole.take(np.flatnonzero(~held_out)),
                  "validation": whole.take(np.flatnonzero(held_out))}  # fmt: skip
        del whole
    counts = {}
    for split, items in images.items():
        index = items.table.column("label_index").to_numpy()
        counts[split] = np.bincount(index, minlength=len(classes))
        if np.any(np.diff(index) < 0):  # by class, listing order within (a copy)
            images[split] = items.take(np.argsort(index, kind="stable"))
    for index, label in enumerate(labels):
        if not counts["train"][index]:
            raise DatasetError(f"{name}: class {label!r} has no training images")
        for split in images:
            if split != "train" and not counts[split][index]:
                warnings.append(f"{name}: class {label!r} has no {split} images")
    images = {split: images[split] for split in SPLITS if split in images}
    if pool is not None:
        images[UNLABELLED] = _unlabelled(listed, pool, labels)
    return DatasetSpec(
        name, location.uri, location.filesystem, labels, images, bool(split_dirs),
        tuple(warnings),
    )  # fmt: skip


def _images(
    files: Tree, relative: pa.ChunkedArray, label_index: np.ndarray, labels: tuple[str, ...],
    root: str,
) -> Images:  # fmt: skip
    """The planned images of ``files``, their paths ``relative`` to the dataset at ``root``."""
    listing = files.listing
    table = pa.table({
        "path": listing.column("path"),  # null where it is the root and the relative path
        "relative_path": relative, "size": listing.column("size"),
        "mtime_ns": listing.column("mtime_ns"), "label_index": pa.array(label_index, pa.int32()),
    }, schema=IMAGES)  # fmt: skip
    return Images(table, labels, root)


def _without(tree: Tree, name: str) -> Tree:
    """``tree`` without its top-level folder ``name``."""
    return Tree(tree.location, tree.listing.filter(pc.invert(tree.under(name))),
                frozenset(f for f in tree.folders if f[0] != name))  # fmt: skip


def _unlabelled(tree: Tree, folder: str, labels: tuple[str, ...]) -> Images:
    """The images under ``folder`` (any depth), with no class, in path order."""
    files = tree.sub(folder)
    unlabelled = np.full(files.listing.num_rows, NO_LABEL_INDEX, np.int32)
    relative = _relative_paths(f"{folder}/", files)
    images = _images(files, relative, unlabelled, labels, tree.location.root)
    return images.take(pc.sort_indices(images.table, [("relative_path", "ascending")]))


def _relative_paths(prefix: str, files: Tree) -> pa.ChunkedArray:
    """``prefix`` and each file's parts joined by ``/``, escaped
    (:func:`storage.names.escape_name`): as they are where the names are UTF-8 without a
    backslash, else a name at a time."""
    chunks = []
    for chunk in files.listing.column("parts").chunks:
        joined = pc.binary_join_element_wise(os_bytes(prefix), pc.binary_join(chunk, b"/"), b"")
        try:
            text = joined.cast(pa.string())
            plain = not pc.any(pc.match_substring(text, "\\")).as_py()
        except pa.ArrowInvalid:  # not UTF-8
            plain = False
        if not plain:
            text = pa.array([escape_name(os_name(b)) for b in joined.to_pylist()], pa.string())
        chunks.append(text)
    return pa.chunked_array(chunks, pa.string())
