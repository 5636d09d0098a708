"""Where each file of a feature store lives; the only code that builds store paths.

```
<store>/<dataset>/<backbone>/manifest.json          what the store holds (the readers' truth)
<store>/<dataset>/<backbone>/_lease.json            the one writer's lease
<store>/<dataset>/<backbone>/_commits/<run>/<split>-<shard>.json   shards committed by a run
<store>/<dataset>/<backbone>/rejects.parquet        every image that could not be used
<store>/<dataset>/<backbone>/<split>/part-SSSSS-of-NNNNN-<attempt>.parquet
<store>/_logs/extract-<time>.jsonl                  one structured log per run
```
Names that start with ``_`` or ``.`` are skipped by Parquet dataset readers. A part file counts
only when the manifest (or a commit record of the manifest's run) names it.
"""

from __future__ import annotations

import posixpath
import re
import time
import uuid
from dataclasses import dataclass

from storage.filesystem import Location, file_info, list_files, list_folders

MANIFEST_NAME = "manifest.json"
LEASE_NAME = "_lease.json"
COMMITS_DIR = "_commits"
REJECTS_NAME = "rejects.parquet"
DERIVED_DIR = "_derived"
LOGS_DIR = "_logs"
PART_PREFIX = "part-"
_PART = re.compile(r"^part-(\d{5})-of-(\d{5})(?:-[0-9a-f]+)?\.parquet$")


def part_name(shard: int, num_shards: int, attempt: str) -> str:
    """The file name of one attempt at shard ``shard`` of ``num_shards``: every attempt writes
    its own file, so a commit never needs a rename and never overwrites another's bytes."""
    return f"{PART_PREFIX}{shard:05d}-of-{num_shards:05d}-{attempt}.parquet"


def new_attempt() -> str:
    return uuid.uuid4().hex[:12]


def is_part_file(name: str) -> bool:
    return bool(_PART.match(name))


@dataclass(frozen=True)
class StoreLayout:
    """The paths of a store rooted at a :class:`Location`."""

    location: Location

    @classmethod
    def at(cls, store: str) -> StoreLayout:
        return cls(Location.at(store))

    @property
    def filesystem(self):
        return self.location.filesystem

    def backbone_dir(self, dataset: str, backbone: str) -> str:
        return self.location.path(dataset, backbone)

    def part_path(
        self, dataset: str, backbone: str, split: str, shard: int, shards: int, attempt: str
    ) -> str:
        return posixpath.join(
            self.backbone_dir(dataset, backbone), split, part_name(shard, shards, attempt)
        )

    def manifest_path(self, dataset: str, backbone: str) -> str:
        return posixpath.join(self.backbone_dir(dataset, backbone), MANIFEST_NAME)

    def lease_path(self, dataset: str, backbone: str) -> str:
        return posixpath.join(self.backbone_dir(dataset, backbone), LEASE_NAME)

    def commits_dir(self, dataset: str, backbone: str, run: str | None = None) -> str:
        base = posixpath.join(self.backbone_dir(dataset, backbone), COMMITS_DIR)
        return posixpath.join(base, run) if run else base

    def commit_path(self, dataset: str, backbone: str, run: str, key: str) -> str:
        return posixpath.join(
            self.commits_dir(dataset, backbone, run), key.replace("/", "-") + ".json"
        )

    def derived_path(self, dataset: str, backbone: str, name: str) -> str:
        """Something computed from the store's rows and kept beside them (out-of-fold
        probabilities): its contents name the manifest they came from."""
        return posixpath.join(self.backbone_dir(dataset, backbone), DERIVED_DIR, name)

    def rejects_path(self, dataset: str, backbone: str) -> str:
        return posixpath.join(self.backbone_dir(dataset, backbone), REJECTS_NAME)

    def log_path(self, command: str) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        return self.location.path(LOGS_DIR, f"{command}-{stamp}-{uuid.uuid4().hex[:6]}.jsonl")

    def relative(self, path: str) -> str:
        """``path`` relative to the store root, as manifests record it."""
        return self.location.relative(path)

    def absolute(self, relative: str) -> str:
        return self.location.path(relative)

    def stores(self) -> list[tuple[str, str]]:
        """Every (dataset, backbone) pair under the root that has a manifest."""
        found = []
        for dataset in list_folders(self.filesystem, self.location.root):
            if dataset.startswith(("_", ".")):
                continue
            for backbone in list_folders(self.filesystem, self.location.path(dataset)):
                if file_info(self.filesystem, self.manifest_path(dataset, backbone)):
                    found.append((dataset, backbone))
        return found

    def part_files(self, dataset: str, backbone: str) -> list[str]:
        """Every part file under a (dataset, backbone), committed or not."""
        return [
            info.path
            for info in list_files(self.filesystem, self.backbone_dir(dataset, backbone))
            if is_part_file(info.base_name)
        ]
