"""The manifest: the record of what a feature store holds and how it was made.

A shard counts only once the manifest records it with its input fingerprint, row count and
checksum. The manifest is rewritten atomically after every finished shard, so a killed run keeps
every shard that finished and a re-run redoes only the rest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow.fs as pafs

from storage.errors import StoreError
from storage.hashing import fingerprint
from storage.layout import read_bytes, write_bytes_atomically

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Reject:
    """An image that could not be used, and why (``reason`` is a short code, ``detail`` prose)."""

    path: str
    split: str
    reason: str
    detail: str


@dataclass(frozen=True)
class ShardRecord:
    split: str
    shard: int
    num_shards: int
    file: str
    input_fingerprint: str
    images: int
    rows: int
    rejects: tuple[Reject, ...]
    sha256: str
    size_bytes: int
    seconds: float
    worker: str = ""

    @property
    def key(self) -> str:
        return shard_key(self.split, self.shard)


def shard_key(split: str, shard: int) -> str:
    return f"{split}/{shard:05d}"


@dataclass(frozen=True)
class TapRecord:
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to trust and interpret a (dataset, backbone) store."""

    dataset: str
    dataset_root: str
    dataset_fingerprint: str
    classes: tuple[str, ...]
    backbone: str
    weights_source: str
    weights_sha256: str
    input_size: tuple[int, int]
    runtime: str
    augment_copies: int
    augment_policy: dict[str, Any]
    seed: int
    taps: dict[str, TapRecord]
    feature_fingerprint: str
    num_shards: int
    split_sizes: dict[str, int]
    wf_version: str
    shards: dict[str, ShardRecord] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    created_at: str = ""
    updated_at: str = ""

    @property
    def manifest_id(self) -> str:
        """Names this exact content: the features' settings, the dataset and the shard files."""
        return fingerprint(
            [
                self.feature_fingerprint,
                self.dataset_fingerprint,
                sorted((k, r.sha256) for k, r in self.shards.items()),
            ]
        )[:16]

    @property
    def class_indices(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.classes)}

    @property
    def rejects(self) -> list[Reject]:
        return [reject for key in sorted(self.shards) for reject in self.shards[key].rejects]

    def is_complete(self) -> bool:
        expected = {shard_key(s, i) for s in self.split_sizes for i in range(self.num_shards)}
        return expected <= set(self.shards)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        if raw.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"manifest format {raw.get('format_version')} is not {FORMAT_VERSION}; "
                "re-extract into a new store"
            )
        raw["classes"] = tuple(raw["classes"])
        raw["input_size"] = tuple(raw["input_size"])
        raw["taps"] = {
            name: TapRecord(tuple(tap["shape"]), tap["dtype"]) for name, tap in raw["taps"].items()
        }
        raw["shards"] = {
            key: ShardRecord(**{**rec, "rejects": tuple(Reject(**r) for r in rec["rejects"])})
            for key, rec in raw["shards"].items()
        }
        return cls(**raw)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_manifest(filesystem: pafs.FileSystem, path: str) -> Manifest | None:
    """The manifest at ``path``, or None when there is none yet."""
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    try:
        return Manifest.from_json(read_bytes(filesystem, path).decode())
    except (ValueError, KeyError, TypeError) as error:
        raise StoreError(f"manifest {path} is unreadable: {error}") from error


def write_manifest(filesystem: pafs.FileSystem, path: str, manifest: Manifest) -> None:
    write_bytes_atomically(filesystem, path, manifest.to_json().encode())
