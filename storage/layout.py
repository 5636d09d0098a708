"""The feature store's layout, and atomic writes through ``pyarrow.fs``.

``<store>/<dataset>/<backbone>/<split>/part-SSSSS-of-NNNNN.parquet`` holds the rows,
``<store>/<dataset>/<backbone>/manifest.json`` says which of those files count, and
``rejects.parquet`` beside it lists every image that could not be used. A store root is a local
path or any URI that ``pyarrow.fs.FileSystem.from_uri`` understands (``s3://``, ``gs://``, ...).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.parquet"
PART_PREFIX = "part-"


def part_name(shard: int, num_shards: int) -> str:
    """The file name of shard ``shard`` of ``num_shards`` (both zero-padded to five digits)."""
    return f"{PART_PREFIX}{shard:05d}-of-{num_shards:05d}.parquet"


def temporary_name(path: str) -> str:
    """A hidden sibling of ``path``: Parquet readers skip names that start with a dot."""
    head, tail = posixpath.split(path)
    return posixpath.join(head, f".{tail}.tmp-{uuid.uuid4().hex}")


@dataclass(frozen=True)
class StoreLayout:
    """Where each file of a store lives; the only code that builds store paths."""

    filesystem: pafs.FileSystem
    root: str

    @classmethod
    def at(cls, store: str) -> StoreLayout:
        if "://" in store:
            filesystem, root = pafs.FileSystem.from_uri(store)
        else:
            filesystem, root = pafs.LocalFileSystem(), os.path.abspath(store)
        return cls(filesystem, root.rstrip("/") or "/")

    def backbone_dir(self, dataset: str, backbone: str) -> str:
        return posixpath.join(self.root, dataset, backbone)

    def split_dir(self, dataset: str, backbone: str, split: str) -> str:
        return posixpath.join(self.backbone_dir(dataset, backbone), split)

    def part_path(self, dataset: str, backbone: str, split: str, shard: int, shards: int) -> str:
        return posixpath.join(self.split_dir(dataset, backbone, split), part_name(shard, shards))

    def manifest_path(self, dataset: str, backbone: str) -> str:
        return posixpath.join(self.backbone_dir(dataset, backbone), MANIFEST_NAME)

    def rejects_path(self, dataset: str, backbone: str) -> str:
        return posixpath.join(self.backbone_dir(dataset, backbone), REJECTS_NAME)

    def relative(self, path: str) -> str:
        """``path`` relative to the store root, as manifests record it."""
        return posixpath.relpath(path, self.root)

    def absolute(self, relative: str) -> str:
        return posixpath.join(self.root, relative)

    def exists(self, path: str) -> bool:
        return self.filesystem.get_file_info(path).type != pafs.FileType.NotFound

    def size(self, path: str) -> int | None:
        info = self.filesystem.get_file_info(path)
        return None if info.type == pafs.FileType.NotFound else info.size

    def datasets(self) -> list[tuple[str, str]]:
        """Every (dataset, backbone) pair under the root that has a manifest."""
        found = []
        selector = pafs.FileSelector(self.root, recursive=False, allow_not_found=True)
        for dataset in self.filesystem.get_file_info(selector):
            if dataset.type != pafs.FileType.Directory:
                continue
            inner = pafs.FileSelector(dataset.path, recursive=False)
            for backbone in self.filesystem.get_file_info(inner):
                if backbone.type == pafs.FileType.Directory and self.exists(
                    posixpath.join(backbone.path, MANIFEST_NAME)
                ):
                    found.append((dataset.base_name, backbone.base_name))
        return sorted(found)

    def part_files(self, dataset: str, backbone: str) -> list[str]:
        """Every visible part file under a (dataset, backbone), recorded or not."""
        selector = pafs.FileSelector(
            self.backbone_dir(dataset, backbone), recursive=True, allow_not_found=True
        )
        return sorted(
            info.path
            for info in self.filesystem.get_file_info(selector)
            if info.type == pafs.FileType.File and info.base_name.startswith(PART_PREFIX)
        )

    def delete(self, path: str) -> None:
        if self.exists(path):
            self.filesystem.delete_file(path)


def write_atomically(
    filesystem: pafs.FileSystem, path: str, write: Callable[[pa.NativeFile], None]
) -> None:
    """Write ``path`` through ``write(stream)`` so that readers see all of it or nothing.

    The bytes go to a hidden temporary sibling first, which is renamed over ``path`` only after
    the stream is closed. A process killed midway leaves at most a hidden ``.*.tmp-*`` file.
    """
    filesystem.create_dir(posixpath.dirname(path), recursive=True)
    temporary = temporary_name(path)
    try:
        with filesystem.open_output_stream(temporary) as stream:
            write(stream)
        filesystem.move(temporary, path)
    except BaseException:
        if filesystem.get_file_info(temporary).type != pafs.FileType.NotFound:
            filesystem.delete_file(temporary)
        raise


def write_bytes_atomically(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    write_atomically(filesystem, path, lambda stream: stream.write(data))


def read_bytes(filesystem: pafs.FileSystem, path: str) -> bytes:
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def file_sha256(filesystem: pafs.FileSystem, path: str, chunk: int = 1 << 20) -> str:
    import hashlib

    digest = hashlib.sha256()
    with filesystem.open_input_stream(path) as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()
