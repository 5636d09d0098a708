"""`wf label DATASET labels.csv`: move labelled images into their class folders, with a log.

Each CSV row ``path,label`` names an image by its path relative to the dataset (as
``suggestions.csv`` and the store name it, e.g. ``unlabelled/batch1/0042.jpg``) and the class it
belongs to. The image moves to ``train/<label>/`` (``<label>/`` in a dataset without split
folders; ``--split`` chooses another split), under its own file name. A file is never
overwritten: a row whose target exists, whose image is missing, or whose label is no folder
name or no class of the dataset (make a new class's folder first) is reported in one line and
the other rows go on. Every move is appended to
``.wf-labels.jsonl`` at the dataset's root (who, when, from, to; a hidden file, so no split or
class): the log of who labelled what. Works the same on an object-store dataset (there a move
is a copy then a delete). The next `wf extract` recomputes only the shards those files touched,
the next `wf train-all` retrains only the datasets whose labelled rows changed.
"""

from __future__ import annotations

import csv
import getpass
import io
import json
import posixpath
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow.fs as pafs

from storage.errors import DatasetError
from storage.filesystem import Location, file_info, read_bytes, write_bytes
from storage.names import unescape_name
from workflows.datasets import SPLIT_ALIASES, SPLITS, UNLABELLED_FOLDERS, list_tree

LOG = ".wf-labels.jsonl"
_LABEL = re.compile(r"^[^/\\\x00]+$")


@dataclass
class LabelReport:
    moved: list[dict[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    log: str = ""


def read_labels(text: str) -> list[tuple[int, str, str]]:
    """``(line, path, label)`` rows of a ``path,label`` CSV (a header row is optional)."""
    rows = []
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not "".join(row).strip():
            continue
        if number == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
            continue
        if len(row) < 2:
            raise DatasetError(f"line {number}: expected path,label, found {','.join(row)!r}")
        rows.append((number, row[0].strip(), row[1].strip()))
    return rows


def label_images(dataset: str, labels_csv: str, split: str = "train") -> LabelReport:
    """Move each CSV row's image into its class folder and log it; see the module."""
    location = Location.at(dataset)
    tree = list_tree(dataset)
    lower = {name.lower(): name for name in tree.children()}
    has_splits = any(name in SPLIT_ALIASES for name in lower)
    if split not in SPLITS:
        raise DatasetError(f"--split must be train, validation or test: {split}")
    folder = ""
    if has_splits:
        found = [lower[a] for a, s in SPLIT_ALIASES.items() if s == split and a in lower]
        folder = found[0] if found else split
    try:
        source = Location.at(labels_csv)
        labels = read_labels(read_bytes(source.filesystem, source.root).decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{labels_csv}: cannot read it ({type(error).__name__})") from error
    within = tree.sub(folder) if folder else tree
    classes = {c for c in within.children() if c.lower() not in UNLABELLED_FOLDERS}
    fs = location.filesystem
    report = LabelReport(log=location.display(location.path(LOG)))
    who, entries = getpass.getuser(), []
    for number, path, label in labels:
        relative = unescape_name(path).strip("/")
        parts = relative.split("/")
        if not _LABEL.match(label) or label.startswith(".") or label.lower() in (
            *SPLIT_ALIASES, *UNLABELLED_FOLDERS
        ):  # fmt: skip
            report.problems.append(f"line {number}: {label!r} is not a class folder name")
            continue
        if label not in classes:
            report.problems.append(f"line {number}: {label!r} is not a class of {location.uri} "
                                   f"(make its folder first to add a class)")  # fmt: skip
            continue
        if ".." in parts or not relative:
            report.problems.append(f"line {number}: {path!r} is not a path inside the dataset")
            continue
        target = posixpath.join(*(p for p in (folder, label, parts[-1]) if p))
        if target == relative:
            report.problems.append(f"line {number}: {path} is already in {label}/")
            continue
        source_path, target_path = location.path(*parts), location.path(*target.split("/"))
        if file_info(fs, source_path) is None:
            report.problems.append(f"line {number}: {path} is not in {location.uri}")
            continue
        if file_info(fs, target_path) is not None:
            report.problems.append(f"line {number}: {target} exists; not overwritten")
            continue
        location.move(source_path, target_path)
        entry = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "by": who,
                 "from": relative, "to": target, "label": label, "csv": labels_csv}  # fmt: skip
        entries.append(entry)
        report.moved.append(entry)
    if entries:
        _append_log(fs, location.path(LOG), entries)
    return report


def _append_log(fs: pafs.FileSystem, path: str, entries: list[dict[str, str]]) -> None:
    """Append to the log (an object store cannot append: read it and write it whole)."""
    before = read_bytes(fs, path) if file_info(fs, path) is not None else b""
    lines = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries).encode()
    write_bytes(fs, path, before + lines)
