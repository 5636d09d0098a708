"""One shard of extraction: read, decode, augment and run the backbone over a list of images,
and write the rows to one Parquet part file.

:func:`extract_shard` is a plain function (tests call it without Ray); :data:`extract_shard_task`
is its thin ``ray.remote`` wrapper. Each task reads its own images straight from where the
dataset lives (a local folder or an object store), so a cluster needs no shared filesystem. The
backbone is built once per worker process and reused by every shard that process runs; images
go through it in batches.
"""

from __future__ import annotations

import os
import posixpath
import resource
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from storage.feature_store import (
    WrittenFile,
    feature_schema,
    rows_to_batch,
    tap_column,
    write_part,
)
from storage.filesystem import (
    ColumnBuilder,
    column_rows,
    column_values,
    os_bytes,
    os_name,
    retrying,
)
from storage.hashing import content_id
from storage.layout import StoreLayout
from storage.manifest import Reject, TapRecord
from storage.names import unescape_name
from tasks.augment import AugmentPolicy, augment_image, copy_seed
from tasks.backbones.runtime import PreparedBackbone, extractor_for
from tasks.images import ImageRejected, decode_image, read_image_bytes

ProgressCallback = Callable[[int, int], None]

# Where a shard's seconds go, each stage timed where it runs (benchmarks/extract_throughput.py
# sums them over workers to explain the gap to the compute limit).
STAGES = ("read", "hash", "decode", "augment", "runtime", "arrow", "write", "progress")


class StageClock:
    """Seconds per stage of one shard; :meth:`timed` adds a block's time to its stage."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)

    def timed(self, stage: str) -> _Timed:
        return _Timed(self.seconds, stage)


class _Timed:
    def __init__(self, seconds: dict[str, float], stage: str) -> None:
        self._seconds, self._stage = seconds, stage

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, *_: object) -> None:
        self._seconds[self._stage] += time.perf_counter() - self._started


@dataclass(frozen=True)
class ImageItem:
    """One image as planned by the driver: where it is, its size and time then, and what it is.

    ``relative_path`` is relative to the dataset and escaped (:mod:`storage.names`); ``path``
    is what the dataset's filesystem opens.
    """

    path: str
    relative_path: str
    size: int
    label: str
    label_index: int
    mtime_ns: int = 0


IMAGES = pa.schema([
    # storage.filesystem.os_bytes of ImageItem.path where it is not the root and the relative
    # path (an object key the relative path normalises: "a//b", "a/./b"), else null (a null
    # costs its 4-byte offset and no bytes).
    ("path", pa.binary()),
    ("relative_path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
    ("label_index", pa.int32()),
])  # fmt: skip


@dataclass(frozen=True, eq=False)
class Images:
    """Planned images as Arrow columns (:data:`IMAGES`), not a Python object each: the driver
    plans every image of a dataset at once, and at ten million images objects were 12-34 GB
    (docs/scaling.md). Iterating gives :class:`ImageItem`, made a batch at a time.
    ``labels`` names the classes by index; index -1 is an unlabelled image (label ``""``).
    ``root`` is the dataset's folder as its filesystem names it: an image's path is the root and
    its relative path (unescaped), so no column repeats the root for every image (it was half
    the plan's bytes, held twice while the shards are cut); ``path`` holds only the rare path
    that is not."""

    table: pa.Table
    labels: tuple[str, ...]
    root: str

    @classmethod
    def of(cls, items: Iterable[ImageItem], labels: tuple[str, ...], root: str) -> Images:
        rows = ColumnBuilder(IMAGES)
        for i in items:
            path = None if i.path == image_path(root, i.relative_path) else os_bytes(i.path)
            rows.append(path, i.relative_path, i.size, i.mtime_ns, i.label_index)
        return cls(rows.table(), labels, root)

    def __len__(self) -> int:
        return self.table.num_rows

    def __iter__(self) -> Iterator[ImageItem]:
        labels, root = self.labels, self.root
        for path, relative, size, mtime, index in column_rows(self.table, IMAGES.names):
            label = labels[index] if index >= 0 else ""
            path = image_path(root, relative) if path is None else os_name(path)
            yield ImageItem(path, relative, size, label, index, mtime)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Images)
            and (self.labels, self.root) == (other.labels, other.root)
            and self.table.equals(other.table)
        )

    def take(self, indices: Any) -> Images:
        return Images(self.table.take(indices), self.labels, self.root)

    def relative_paths(self) -> Iterator[str]:
        return column_values(self.table.column("relative_path"))

    def signature_rows(self) -> Iterator[list]:
        """Each image's ``[relative_path, size, mtime_ns, label]`` (what a shard's input
        fingerprint hashes), from the columns: no :class:`ImageItem` is made."""
        labels, names = self.labels, ["relative_path", "size", "mtime_ns", "label_index"]
        for relative, size, mtime, index in column_rows(self.table, names):
            yield [relative, size, mtime, labels[index] if index >= 0 else ""]

    def relabel(self, labels: tuple[str, ...]) -> Images:
        """Only the images of classes in ``labels``, indexed by their place there (an
        unlabelled image stays -1)."""
        gone = -2
        mapping = np.array([labels.index(c) if c in labels else gone for c in self.labels], int)
        index = self.table.column("label_index").to_numpy().astype(np.int32)
        labelled = index >= 0
        index[labelled] = mapping[index[labelled]]
        table = self.table.set_column(
            IMAGES.get_field_index("label_index"), "label_index", pa.array(index)
        ).filter(pa.array(index != gone))  # fmt: skip
        return Images(table, labels, self.root)


def image_path(root: str, relative_path: str) -> str:
    """Where an image of the dataset at ``root`` is, from its escaped relative path."""
    return posixpath.join(root, unescape_name(relative_path))


@dataclass(frozen=True)
class ShardJob:
    dataset: str
    split: str
    shard: int
    num_shards: int
    # The images; until the driver submits the job, a reference to them on its disk
    # (workflows.planned.ShardRef), so that jobs waiting to run hold no rows.
    items: Images | Any
    source: pafs.FileSystem  # where the images are
    layout: StoreLayout  # where the part goes
    output_path: str
    classes: tuple[str, ...]
    augment_copies: int
    policy: AugmentPolicy
    seed: int
    dtype: str
    batch_size: int
    max_pixels: int
    threads: int

    def loaded(self) -> ShardJob:
        """The job with its images in it (read from the driver's disk where they wait)."""
        return self if isinstance(self.items, Images) else replace(self, items=self.items.load())


@dataclass(frozen=True)
class ShardResult:
    split: str
    shard: int
    images: int
    rows: int
    rejects: tuple[Reject, ...]
    class_images: tuple[int, ...]
    path: str
    sha256: str
    size_bytes: int
    seconds: float
    worker: str
    node: str
    peak_rss_mib: float
    started_at: float = 0.0  # wall clock (time.time()) when the task began
    stages: tuple[tuple[str, float], ...] = ()  # seconds per stage (STAGES), this shard's


def _decoded(
    job: ShardJob, size: tuple[int, int], rejects: list[Reject], clock: StageClock
) -> Iterator[tuple[ImageItem, str, np.ndarray]]:
    for item in job.items:
        try:
            with clock.timed("read"):
                data = read_image_bytes(job.source, item.path)
            if data and len(data) != item.size:
                raise ImageRejected("changed", f"{item.size} bytes when planned, {len(data)} now")
            with clock.timed("hash"):
                image_id = content_id(data)
            with clock.timed("decode"):
                pixels = decode_image(data, size, job.max_pixels)
            yield item, image_id, pixels
        except ImageRejected as rejected:
            rejects.append(Reject(item.relative_path, job.split, rejected.reason, rejected.detail))


def _batches(
    job: ShardJob,
    prepared: PreparedBackbone,
    schema: pa.Schema,
    rejects: list[Reject],
    class_images: list[int],
    progress: ProgressCallback | None,
    clock: StageClock,
) -> Iterator[pa.RecordBatch]:
    extractor = extractor_for(prepared, job.threads)
    copies = 1 + (job.augment_copies if job.split == "train" else 0)
    pending: list[tuple[ImageItem, str, int, np.ndarray]] = []
    reported_rejects = 0

    def flush() -> pa.RecordBatch:
        nonlocal reported_rejects
        with clock.timed("runtime"):
            features = extractor(np.stack([pixels for *_, pixels in pending]))
        with clock.timed("arrow"):
            columns: dict[str, Any] = {
                "image_id": [image_id for _, image_id, _, _ in pending],
                "path": [item.relative_path for item, *_ in pending],
                "label": [item.label for item, *_ in pending],
                "label_index": [item.label_index for item, *_ in pending],
                "split": [job.split] * len(pending),
                "copy": [copy for _, _, copy, _ in pending],
            }
            for tap, values in features.items():
                columns[tap_column(tap)] = values
            batch = rows_to_batch(schema, columns)
        if progress is not None:
            with clock.timed("progress"):
                images = sum(1 for _, _, copy, _ in pending if copy == 0)
                progress(images, len(rejects) - reported_rejects)
            reported_rejects = len(rejects)
        pending.clear()
        return batch

    for item, image_id, pixels in _decoded(job, prepared.input_size, rejects, clock):
        if item.label_index >= 0:  # an unlabelled image has no class to count
            class_images[item.label_index] += 1
        pending.append((item, image_id, 0, pixels))
        with clock.timed("augment"):
            for copy in range(1, copies):
                seed = copy_seed(image_id, copy, job.seed)
                pending.append((item, image_id, copy, augment_image(pixels, job.policy, seed)))
        if len(pending) >= job.batch_size:
            yield flush()
    if pending:
        yield flush()
    if progress is not None and len(rejects) > reported_rejects:
        progress(0, len(rejects) - reported_rejects)


def extract_shard(
    job: ShardJob, prepared: PreparedBackbone, progress: ProgressCallback | None = None
) -> ShardResult:
    """Extract ``job`` and write its part file; bad images become rejects, never failures."""
    started, started_at = time.perf_counter(), time.time()
    job = job.loaded()
    taps = {tap: TapRecord(shape, job.dtype) for tap, shape in prepared.taps.items()}
    schema = feature_schema(taps, job.classes)
    rejects: list[Reject] = []
    class_images = [0] * len(job.classes)

    clock = StageClock()

    def attempt() -> WrittenFile:
        rejects.clear()
        class_images[:] = [0] * len(job.classes)
        clock.seconds.update(dict.fromkeys(STAGES, 0.0))
        begun = time.perf_counter()
        batches = _batches(job, prepared, schema, rejects, class_images, progress, clock)
        written = write_part(job.layout, job.output_path, schema, batches)
        # What write_part spent outside the batches it pulled: Parquet encoding and the upload.
        inside = sum(v for k, v in clock.seconds.items() if k != "write")
        clock.seconds["write"] = max(0.0, time.perf_counter() - begun - inside)
        return written

    # An object store that stops answering mid-upload: the shard is made again, after a
    # backoff, until the store's retry policy gives up (then the task fails, one line).
    written = retrying(job.layout.filesystem, attempt)
    return ShardResult(
        split=job.split,
        shard=job.shard,
        images=len(job.items) - len(rejects),
        rows=written.rows,
        rejects=tuple(rejects),
        class_images=tuple(class_images),
        path=written.path,
        sha256=written.sha256,
        size_bytes=written.size_bytes,
        seconds=time.perf_counter() - started,
        worker=f"{socket.gethostname()}:{os.getpid()}",
        node=ray.get_runtime_context().get_node_id() if ray.is_initialized() else "",
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        started_at=started_at,
        stages=tuple((k, round(v, 6)) for k, v in clock.seconds.items()),
    )


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class ProgressCounter:
    """Counts images and rejects as shards report them; the driver polls :meth:`totals`.
    Only for people watching: the run's results never depend on it."""

    def __init__(self) -> None:
        self._totals: dict[str, list[int]] = {}

    def add(self, dataset: str, images: int, rejects: int) -> None:
        totals = self._totals.setdefault(dataset, [0, 0])
        totals[0] += images
        totals[1] += rejects

    def totals(self) -> dict[str, list[int]]:
        return self._totals


def _extract_shard_on_worker(
    job: ShardJob, prepared: PreparedBackbone, counter: Any | None
) -> ShardResult:
    def report(images: int, rejects: int) -> None:
        counter.add.remote(job.dataset, images, rejects)

    return extract_shard(job, prepared, report if counter is not None else None)


# A task lost with its node (or its worker process) runs again elsewhere; its half-written part
# is never committed, so no row is counted twice.
extract_shard_task = ray.remote(max_retries=3, retry_exceptions=False)(_extract_shard_on_worker)
