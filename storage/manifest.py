"""The manifest: the record of what a feature store holds and how it was made.

A shard counts once it is committed: the driver writes a small commit record for it under
``_commits/<run>/`` (one object per shard, so committing costs the same at shard 1 and shard
10,000), and readers fold the records of the manifest's own run into the manifest. The run
folds them into ``manifest.json`` itself when it ends (compaction). A killed run keeps every
shard it committed; the next run starts from the folded view and redoes only the rest. Records
of any other run are ignored, so nothing a dead writer left behind can come back.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from storage.errors import StoreError
from storage.filesystem import (
    delete_file,
    delete_folder,
    file_info,
    list_files,
    list_folders,
    read_bytes,
    remove_temporaries,
    write_bytes,
)
from storage.hashing import fingerprint
from storage.layout import StoreLayout

FORMAT_VERSION = 2


@dataclass(frozen=True)
class Reject:
    """An image that could not be used, and why (``reason`` is a short code, ``detail`` prose);
    ``path`` is relative to the dataset, escaped as :mod:`storage.names` says."""

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
    class_images: tuple[int, ...] = ()  # usable images per class index
    worker: str = ""  # host:pid of the process that wrote the part
    node: str = ""  # the Ray node it ran on
    peak_rss_mib: float = 0.0  # that process's peak memory

    @property
    def key(self) -> str:
        return shard_key(self.split, self.shard)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ShardRecord:
        return cls(
            **{
                **raw,
                "rejects": tuple(Reject(**r) for r in raw["rejects"]),
                "class_images": tuple(raw.get("class_images", ())),
            }
        )


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
    calibration: str = ""  # fingerprint of the images an int8 runtime was calibrated on
    preprocessing: str = ""  # an ONNX backbone's sidecar fingerprint (what its features used)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
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
    def labelled_id(self) -> str:
        """Names what training reads: the features' settings, the classes and the shard files
        of every split but ``unlabelled`` (new unlabelled images retrain nothing)."""
        return fingerprint(
            [
                self.feature_fingerprint,
                list(self.classes),
                sorted((k, r.sha256) for k, r in self.shards.items() if r.split != "unlabelled"),
            ]
        )[:16]

    @property
    def rejects(self) -> list[Reject]:
        return [reject for key in sorted(self.shards) for reject in self.shards[key].rejects]

    def expected_keys(self) -> set[str]:
        return {shard_key(s, i) for s in self.split_sizes for i in range(self.num_shards)}

    def is_complete(self) -> bool:
        return self.expected_keys() <= set(self.shards)

    def images_per_class(self, split: str) -> list[int]:
        """Usable images of each class in ``split``, over the committed shards."""
        counts = [0] * len(self.classes)
        for record in self.shards.values():
            if record.split == split:
                for index, count in enumerate(record.class_images):
                    counts[index] += count
        return counts

    def images_in(self, split: str) -> int:
        """Usable images in ``split`` (an unlabelled split's too), over the committed shards."""
        return sum(r.images for r in self.shards.values() if r.split == split)

    def files(self, split: str) -> list[str]:
        """The committed part files of ``split`` (relative to the store), in shard order."""
        records = sorted(
            (r for r in self.shards.values() if r.split == split), key=lambda r: r.shard
        )
        return [record.file for record in records]

    def with_shard(self, record: ShardRecord) -> Manifest:
        return replace(self, shards={**self.shards, record.key: record}, updated_at=now_iso())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, found {type(raw).__name__}")
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
        raw["shards"] = {key: ShardRecord.from_dict(rec) for key, rec in raw["shards"].items()}
        return cls(**raw)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_manifest(layout: StoreLayout, dataset: str, backbone: str) -> Manifest | None:
    """The store's manifest with its run's commit records folded in, or None when there is no
    store yet; anything unreadable is one :class:`StoreError` naming the file."""
    path = layout.manifest_path(dataset, backbone)
    if file_info(layout.filesystem, path) is None:
        return None
    shown = layout.location.display(path)
    try:
        manifest = Manifest.from_json(read_bytes(layout.filesystem, path).decode())
    except StoreError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise StoreError(f"manifest {shown} is unreadable: {error}") from None
    commits = list_files(layout.filesystem, layout.commits_dir(dataset, backbone, manifest.run_id))
    shards = dict(manifest.shards)
    for info in commits:
        try:
            record = ShardRecord.from_dict(json.loads(read_bytes(layout.filesystem, info.path)))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise StoreError(
                f"commit record {layout.location.display(info.path)} is unreadable: {error}"
            ) from None
        shards[record.key] = record
    return replace(manifest, shards=shards)


def write_manifest(layout: StoreLayout, manifest: Manifest) -> None:
    """Write the whole manifest atomically (its run's commit records become redundant)."""
    write_bytes(
        layout.filesystem,
        layout.manifest_path(manifest.dataset, manifest.backbone),
        manifest.to_json().encode(),
    )


def commit_shard(layout: StoreLayout, manifest: Manifest, record: ShardRecord) -> int:
    """Make a finished shard count: one small commit record, whatever the store's size.
    Returns the bytes written."""
    path = layout.commit_path(manifest.dataset, manifest.backbone, manifest.run_id, record.key)
    data = json.dumps(asdict(record), sort_keys=True).encode()
    write_bytes(layout.filesystem, path, data)
    return len(data)


def compact(layout: StoreLayout, manifest: Manifest) -> None:
    """Fold the run's commits into ``manifest.json`` and drop every commit record."""
    write_manifest(layout, manifest)
    delete_folder(layout.filesystem, layout.commits_dir(manifest.dataset, manifest.backbone))


def remove_unreferenced(layout: StoreLayout, manifest: Manifest) -> int:
    """Delete every part file the manifest does not name, commit records of other runs and
    temporary files: what killed or superseded runs left. Only under the store's lease."""
    named = {layout.absolute(record.file) for record in manifest.shards.values()}
    removed = 0
    for path in layout.part_files(manifest.dataset, manifest.backbone):
        if path not in named:
            delete_file(layout.filesystem, path)
            removed += 1
    commits = layout.commits_dir(manifest.dataset, manifest.backbone)
    for run in list_folders(layout.filesystem, commits):
        if run != manifest.run_id:
            delete_folder(
                layout.filesystem, layout.commits_dir(manifest.dataset, manifest.backbone, run)
            )
    folder = layout.backbone_dir(manifest.dataset, manifest.backbone)
    return removed + remove_temporaries(layout.filesystem, folder)
