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

import posixpath
import re
from dataclasses import dataclass

import pyarrow.fs as pafs

from storage.errors import DatasetError
from storage.filesystem import Location, TreeFile
from storage.hashing import fingerprint, stable_unit_interval
from storage.names import escape_name
from tasks.extract_shard import ImageItem
from tasks.images import is_ignored_file

SPLITS = ("train", "validation", "test")
UNLABELLED = "unlabelled"  # the split of images with no class yet
UNLABELLED_FOLDERS = ("unlabelled", "unlabeled")
NO_LABEL, NO_LABEL_INDEX = "", -1
SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation",
                 "valid": "validation", "test": "test"}  # fmt: skip
_SPLIT_SALT = "wf-validation-split"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Tree:
    """Everything under a folder, listed once: files and folders, hidden names left out."""

    location: Location
    files: tuple[TreeFile, ...]
    folders: frozenset[tuple[str, ...]]

    def sub(self, name: str) -> Tree:
        location = self.location
        inside = Location(location.filesystem, location.path(name), f"{location.uri}/{name}")
        files = tuple(
            TreeFile(e.parts[1:], e.path, e.size, e.mtime_ns)
            for e in self.files
            if e.parts[0] == name and len(e.parts) > 1
        )
        folders = frozenset(f[1:] for f in self.folders if f[0] == name and len(f) > 1)
        return Tree(inside, files, folders)

    def children(self) -> list[str]:
        return sorted({f[0] for f in self.folders})

    def loose_files(self) -> list[TreeFile]:
        return [e for e in self.files if len(e.parts) == 1]


def list_tree(where: str) -> Tree:
    """The files and folders under ``where``, or :class:`DatasetError` when it is no folder."""
    location = Location.at(where)
    if location.kind() != "folder":  # file_info retries a store that stops answering
        raise DatasetError(f"{where} is not a folder")
    files, folders = location.tree(is_ignored_file)
    return Tree(location, tuple(files), frozenset(folders))


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    root: str  # the path or URI the images are read from
    source: pafs.FileSystem
    classes: tuple[str, ...]
    images: dict[str, tuple[ImageItem, ...]]
    split_folders: bool
    warnings: tuple[str, ...]
    signatures: dict[str, tuple[int, int]]  # relative path -> (size, mtime)

    @property
    def fingerprint(self) -> str:
        return fingerprint(
            [list(self.classes), {split: [[i.relative_path, *self.signatures[i.relative_path]]
                                          for i in items] for split, items in self.images.items()}]
        )  # fmt: skip


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
    return bool(set(splits) - {UNLABELLED}) or any(
        len(e.parts) == 2 and e.parts[0] != splits.get(UNLABELLED) for e in tree.files
    )


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


def _by_class(tree: Tree, where: str, warnings: list[str]) -> dict[str, list[TreeFile]]:
    loose = tree.loose_files()
    if loose:
        warnings.append(f"{where}: ignored {len(loose)} files outside class folders")
    classes: dict[str, list[TreeFile]] = {name: [] for name in tree.children()}
    for entry in tree.files:
        if len(entry.parts) > 1:
            classes[entry.parts[0]].append(entry)
    return classes


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
    per_split: dict[str, dict[str, list[tuple[str, TreeFile]]]] = {}
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
            warnings.append(
                f"{name}: ignored {len(tree.loose_files())} files outside split folders"
            )
        for split, folder in split_dirs.items():
            classes = _by_class(tree.sub(folder), f"{name}/{split}", warnings)
            per_split[split] = {c: [(f"{folder}/{c}", e) for e in es] for c, es in classes.items()}
    else:
        per_split = {"train": {}, "validation": {}}
        for label, entries in _by_class(tree, name, warnings).items():
            for split in per_split.values():
                split.setdefault(label, [])
            for entry in entries:
                held_out = (
                    stable_unit_interval(_relative(entry.parts), _SPLIT_SALT) < validation_fraction
                )
                per_split["validation" if held_out else "train"][label].append((label, entry))

    classes = tuple(sorted(set().union(*(set(c) for c in per_split.values()))))
    if len(classes) < 2:
        found = f"only {escape_name(classes[0])!r}" if classes else "none"
        raise DatasetError(f"{name}: a classifier needs at least two class folders, found {found}")
    for label in classes:
        if not per_split["train"].get(label):
            raise DatasetError(f"{name}: class {escape_name(label)!r} has no training images")
        for split in per_split:
            if split != "train" and not per_split[split].get(label):
                warnings.append(f"{name}: class {escape_name(label)!r} has no {split} images")
    images, signatures = {}, {}
    for split in (s for s in SPLITS if s in per_split):
        items = []
        for index, label in enumerate(classes):
            for prefix, entry in per_split[split].get(label, []):
                relative = _relative((*prefix.split("/"), *entry.parts[1:]))
                signatures[relative] = (entry.size, entry.mtime_ns)
                items.append(ImageItem(entry.path, relative, entry.size, escape_name(label), index))
        images[split] = tuple(items)
    if pool is not None:
        images[UNLABELLED] = _unlabelled(listed, pool, signatures)
    return DatasetSpec(
        name, location.uri, location.filesystem, tuple(escape_name(c) for c in classes), images,
        bool(split_dirs), tuple(warnings), signatures,
    )  # fmt: skip


def _without(tree: Tree, name: str) -> Tree:
    """``tree`` without its top-level folder ``name``."""
    return Tree(tree.location, tuple(e for e in tree.files if e.parts[0] != name),
                frozenset(f for f in tree.folders if f[0] != name))  # fmt: skip


def _unlabelled(
    tree: Tree, folder: str, signatures: dict[str, tuple[int, int]]
) -> tuple[ImageItem, ...]:
    """The images under ``folder`` (any depth), with no class, in path order."""
    items = []
    for entry in tree.sub(folder).files:
        relative = _relative((folder, *entry.parts))
        signatures[relative] = (entry.size, entry.mtime_ns)
        items.append(ImageItem(entry.path, relative, entry.size, NO_LABEL, NO_LABEL_INDEX))
    return tuple(sorted(items, key=lambda i: i.relative_path))


def _relative(parts: tuple[str, ...]) -> str:
    """A path relative to the dataset, escaped: valid UTF-8 whatever the file's name."""
    return escape_name("/".join(parts))
