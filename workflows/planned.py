"""A dataset's planned images on the driver's disk, cut into their shards as they are listed.

Planning streams: each batch of listed files becomes planned images (:data:`PLANNED`) that go
straight to the (split, shard) they belong to, spilled to Arrow files under the temporary folder
(``TMPDIR``) a few hundred thousand rows at a time. A shard is read back, sorted into the order
the whole split's list had (by class, then as listed; unlabelled images by path) and written
once more, sorted, when it is first asked for: one shard's rows in memory, never the dataset's.
The split's own order (for the dataset's fingerprint) is a merge of its sorted shards, a batch
of each at a time. So the driver's memory no longer grows with the images (docs/scaling.md,
``benchmarks/planning_memory.py``); its disk holds about three copies of the rows' bytes.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.extract_shard import IMAGES, Images

# The planned images' columns: an image's and ``order``, what sorts it within its class as the
# listing was (storage.filesystem.LISTED's ``order``; an unlabelled image's relative path).
PLANNED = IMAGES.append(pa.field("order", pa.binary()))
SORT_KEYS = [("label_index", "ascending"), ("order", "ascending")]
BUFFER_ROWS = 1 << 16  # rows held before they are spilled to their shards' files
OPEN_FILES = 128  # shards' spill files kept open between spills; another starts a new file
MERGE_ROWS = 1 << 16  # rows the merge holds in all: a batch of each sorted shard,
MERGE_MIN_BATCH = 1024  # but at least this many rows a batch


@dataclass(frozen=True)
class ShardRef:
    """A planned shard on the driver's disk: what a :class:`tasks.extract_shard.ShardJob` carries
    until the driver submits it (:meth:`load`), so that the jobs waiting to run hold no rows."""

    path: str
    labels: tuple[str, ...]  # the classes the rows' indices name
    classes: tuple[str, ...]  # the classes the job extracts (fewer when some were dropped)
    root: str
    count: int

    def __len__(self) -> int:
        return self.count

    def load(self) -> Images:
        with pa.OSFile(self.path) as source:
            table = pa.ipc.open_file(source).read_all().drop_columns(["order"])
        images = Images(table, self.labels, self.root)
        return images if self.classes == self.labels else images.relabel(self.classes)


class PlannedImages:
    """The images of a dataset's ``splits``, each cut into ``shards`` by the caller as it adds
    them (:meth:`add`), for :meth:`shard` and :meth:`merged` to read back in order."""

    def __init__(
        self, labels: tuple[str, ...], root: str, splits: tuple[str, ...], shards: int
    ) -> None:
        self.labels, self.root, self.splits, self.shards = labels, root, splits, shards
        self._keep = tempfile.TemporaryDirectory(prefix="wf-plan-")
        self._buffer: dict[tuple[str, int], list[pa.Table]] = {}
        self._buffered = 0
        self._files: dict[tuple[str, int], list[str]] = {}
        self._open: OrderedDict[tuple[str, int], tuple[pa.NativeFile, Any]] = OrderedDict()
        self._sorted: dict[tuple[str, int], str] = {}
        # Images per (split, shard) and class; the last place counts unlabelled images.
        self.counts: dict[tuple[str, int], np.ndarray] = {}

    def add(self, split: str, rows: pa.Table, shards: np.ndarray) -> None:
        """Rows of :data:`PLANNED` for ``split``, each to the shard ``shards`` names."""
        order = np.argsort(shards, kind="stable")
        bounds = np.cumsum(np.bincount(shards, minlength=self.shards))
        for shard, (start, end) in enumerate(zip([0, *bounds[:-1]], bounds, strict=True)):
            if start == end:
                continue
            piece = rows.take(order[start:end])
            self._buffer.setdefault((split, shard), []).append(piece)
            index = piece.column("label_index").to_numpy()  # -1, unlabelled, counts last
            counts = np.bincount(np.where(index < 0, len(self.labels), index),
                                 minlength=len(self.labels) + 1)  # fmt: skip
            self.counts[split, shard] = self.counts.get((split, shard), 0) + counts
        self._buffered += rows.num_rows
        if self._buffered >= BUFFER_ROWS:
            self.flush()

    def flush(self) -> None:
        """Spill what is held to its shards' files (the most recently written kept open)."""
        for key, pieces in self._buffer.items():
            if key not in self._open:
                files = self._files.setdefault(key, [])
                files.append(f"{self._keep.name}/{key[0]}-{key[1]}-{len(files)}.arrow")
                sink = pa.OSFile(files[-1], "wb")
                self._open[key] = (sink, pa.ipc.new_stream(sink, PLANNED))
            self._open.move_to_end(key)
            for piece in pieces:
                self._open[key][1].write_table(piece)
            while len(self._open) > OPEN_FILES:
                self._close(next(iter(self._open)))
        self._buffer, self._buffered = {}, 0

    def _close(self, key: tuple[str, int]) -> None:
        sink, writer = self._open.pop(key)
        writer.close()
        sink.close()

    def size(self, split: str, shard: int, classes: tuple[str, ...] | None = None) -> int:
        """The images of a shard, of ``classes`` only (and every unlabelled one) when given."""
        counts = self.counts.get((split, shard))
        if counts is None:
            return 0
        if classes is None:
            return int(counts.sum())
        kept = [i for i, label in enumerate(self.labels) if label in classes]
        return int(counts[kept].sum() + counts[-1])

    def class_counts(self, split: str) -> np.ndarray:
        """Images of ``split`` per class (in :attr:`labels`' order)."""
        total = np.zeros(len(self.labels) + 1, np.int64)
        for shard in range(self.shards):
            total += self.counts.get((split, shard), 0)
        return total[:-1]

    def shard(self, split: str, shard: int, classes: tuple[str, ...] | None = None) -> ShardRef:
        """The shard, sorted (written once), as a reference that loads its images."""
        key = (split, shard)
        if key not in self._sorted:
            self.flush()
            if key in self._open:
                self._close(key)
            path = f"{self._keep.name}/{split}-{shard}.sorted.arrow"
            pieces = []
            for spilled in self._files.pop(key, []):
                with pa.OSFile(spilled) as source:
                    pieces.append(pa.ipc.open_stream(source).read_all())
                os.remove(spilled)
            table = pa.concat_tables(pieces) if pieces else PLANNED.empty_table()
            table = table.sort_by(SORT_KEYS)
            with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, PLANNED) as writer:
                writer.write_table(
                    table, max_chunksize=max(MERGE_MIN_BATCH, MERGE_ROWS // self.shards)
                )
            del table, pieces
            self._sorted[key] = path
        classes = self.labels if classes is None else classes
        return ShardRef(self._sorted[key], self.labels, classes, self.root,
                        self.size(split, shard, classes))  # fmt: skip

    def merged(self, split: str) -> Iterator[pa.Table]:
        """The split's rows (with ``order``) in the order of the split's whole list, a few
        thousand at a time: a merge of its sorted shards, holding one batch of each."""
        streams = [_batches(self.shard(split, s).path) for s in range(self.shards)]
        heads: list[pa.Table | None] = [next(s, None) for s in streams]
        while True:
            live = [i for i, head in enumerate(heads) if head is not None]
            if not live:
                return
            # Every row up to the smallest of the heads' last keys can go: no stream holds a
            # smaller one further on. The head that key ends is used up, so each round moves.
            bound = min(_key(heads[i], heads[i].num_rows - 1) for i in live)
            taken = []
            for i in live:
                head = heads[i]
                n = int(pc.sum(_at_most(head, bound)).as_py() or 0)
                taken.append(head.slice(0, n))
                heads[i] = head.slice(n) if n < head.num_rows else next(streams[i], None)
            chunk = pa.concat_tables(taken)
            yield chunk.take(pc.sort_indices(chunk, SORT_KEYS))

    def images(self, split: str, classes: tuple[str, ...] | None = None) -> Images:
        """The whole split in memory, in its order (for small datasets and tests)."""
        chunks = list(self.merged(split))
        table = pa.concat_tables(chunks) if chunks else PLANNED.empty_table()
        images = Images(table.drop_columns(["order"]), self.labels, self.root)
        if classes is None or classes == self.labels:
            return images
        return images.relabel(classes)


def _batches(path: str) -> Iterator[pa.Table]:
    with pa.OSFile(path) as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            if batch.num_rows:
                yield pa.Table.from_batches([batch])


def _key(table: pa.Table, row: int) -> tuple[int, bytes]:
    return table.column("label_index")[row].as_py(), table.column("order")[row].as_py()


def _at_most(table: pa.Table, bound: tuple[int, bytes]) -> pa.ChunkedArray:
    """Whether each row's (label_index, order) is at most ``bound``."""
    label, order = table.column("label_index"), table.column("order")
    below = pc.less(label, pa.scalar(bound[0], pa.int32()))
    tied = pc.and_(pc.equal(label, pa.scalar(bound[0], pa.int32())),
                   pc.less_equal(order, pa.scalar(bound[1], pa.binary())))  # fmt: skip
    return pc.or_(below, tied)
