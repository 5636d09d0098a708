"""Finding datasets and their images: classes, splits and content ids, computed once.

A dataset is a folder with one sub-folder per class. It may hold split folders (``train/``,
``validation/`` and optionally ``test/``; ``val`` and ``valid`` are read as ``validation``),
each with the class folders. Without them, each image goes to validation when a stable hash of
its relative path falls under the validation fraction, so the split never changes between runs
or machines. Classes are the sorted folder names, the same indices for every split.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from storage.errors import DatasetError
from storage.hashing import content_id, fingerprint, stable_unit_interval
from tasks.extract_shard import ImageItem
from tasks.images import is_ignored_file

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation",
                 "valid": "validation", "test": "test"}  # fmt: skip
_SPLIT_SALT = "wf-validation-split"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    root: str
    classes: tuple[str, ...]
    images: dict[str, tuple[ImageItem, ...]]
    split_folders: bool
    warnings: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        return fingerprint(
            [
                list(self.classes),
                {
                    split: [[i.relative_path, i.image_id] for i in items]
                    for split, items in self.images.items()
                },
            ]
        )

    @property
    def num_images(self) -> int:
        return sum(len(items) for items in self.images.values())


def _visible_entries(folder: str) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as entries:
        return sorted((e for e in entries if not is_ignored_file(e.name)), key=lambda e: e.name)


def _split_folders(root: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for entry in _visible_entries(root):
        split = SPLIT_ALIASES.get(entry.name.lower())
        if split and entry.is_dir():
            if split in found:
                raise DatasetError(
                    f"{root}: both {found[split]} and {entry.path} are {split} folders"
                )
            found[split] = entry.path
    return found


def is_dataset(folder: str) -> bool:
    """A dataset has split folders, or at least one class folder that directly holds files."""
    if _split_folders(folder):
        return True
    for entry in _visible_entries(folder):
        if entry.is_dir() and any(e.is_file() for e in _visible_entries(entry.path)):
            return True
    return False


def expand_dataset_paths(paths: list[str]) -> list[str]:
    """Each path as a dataset, or, for a folder of datasets, each dataset in it."""
    found: list[str] = []
    for path in paths:
        folder = os.path.abspath(os.path.expanduser(path))
        if not os.path.isdir(folder):
            raise DatasetError(f"{path} is not a folder")
        if is_dataset(folder):
            found.append(folder)
            continue
        children = [e.path for e in _visible_entries(folder) if e.is_dir() and is_dataset(e.path)]
        if not children:
            raise DatasetError(
                f"{path} holds no images in class folders (expected DATASET/CLASS/IMAGE, "
                "DATASET/SPLIT/CLASS/IMAGE or a folder of such datasets)"
            )
        found.extend(children)
    return found


def _files_under(folder: str) -> list[str]:
    files = []
    for current, directories, names in os.walk(folder):
        directories[:] = sorted(d for d in directories if not is_ignored_file(d))
        files.extend(os.path.join(current, n) for n in sorted(names) if not is_ignored_file(n))
    return files


def _class_folders(folder: str) -> tuple[dict[str, str], list[str]]:
    classes, loose = {}, []
    for entry in _visible_entries(folder):
        if entry.is_dir():
            classes[entry.name] = entry.path
        elif entry.is_file():
            loose.append(entry.name)
    return classes, loose


def discover_dataset(root: str, validation_fraction: float, name: str | None = None) -> DatasetSpec:
    """Classes, splits and images of the dataset at ``root``, or a :class:`DatasetError`."""
    root = os.path.abspath(os.path.expanduser(root))
    name = name or os.path.basename(root)
    if not _NAME.match(name):
        raise DatasetError(f"dataset name {name!r} must be letters, digits, '.', '_' or '-'")
    if not os.path.isdir(root):
        raise DatasetError(f"dataset folder {root} does not exist")
    warnings: list[str] = []
    split_dirs = _split_folders(root)
    per_split: dict[str, dict[str, list[str]]] = {}
    if split_dirs:
        if "train" not in split_dirs:
            raise DatasetError(f"{name}: has {', '.join(split_dirs)} folders but no train/ folder")
        for split, folder in split_dirs.items():
            class_dirs, loose = _class_folders(folder)
            if loose:
                warnings.append(f"{name}/{split}: ignored {len(loose)} files outside class folders")
            per_split[split] = {c: _files_under(d) for c, d in class_dirs.items()}
    else:
        class_dirs, loose = _class_folders(root)
        if loose:
            warnings.append(f"{name}: ignored {len(loose)} files outside class folders")
        per_split = {"train": {}, "validation": {}}
        for label, folder in class_dirs.items():
            for path in _files_under(folder):
                relative = os.path.relpath(path, root)
                held_out = stable_unit_interval(relative, _SPLIT_SALT) < validation_fraction
                per_split["validation" if held_out else "train"].setdefault(label, []).append(path)
            for split in per_split.values():
                split.setdefault(label, [])

    classes = tuple(sorted(set().union(*(set(c) for c in per_split.values()))))
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise DatasetError(f"{name}: a classifier needs at least two class folders, found {found}")
    for label in classes:
        if not per_split["train"].get(label):
            raise DatasetError(f"{name}: class {label!r} has no training images")
        for split in per_split:
            if split != "train" and not per_split[split].get(label):
                warnings.append(f"{name}: class {label!r} has no {split} images")
    index = {label: i for i, label in enumerate(classes)}
    images = {}
    for split in (s for s in SPLITS if s in per_split):
        items = []
        for label in classes:
            for path in per_split[split].get(label, []):
                items.append(
                    ImageItem(
                        path, os.path.relpath(path, root), _content_id(path), label, index[label]
                    )
                )
        images[split] = tuple(items)
    return DatasetSpec(name, root, classes, images, bool(split_dirs), tuple(warnings))


def _content_id(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            return content_id(handle.read())
    except OSError:
        return ""  # unreadable: the shard task rejects it with the reason
