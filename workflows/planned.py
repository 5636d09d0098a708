"""A dataset's planned images on the driver's disk, cut into their shards as they are listed.

Planning streams: each batch of listed files becomes planned images (:data:`PLANNED`) that go
straight to the (split, shard) they belong to, spilled to Arrow files under the temporary folder
(``TMPDIR``) some 65,000 rows at a time, into one file per group of shards (a split's shards
spread over :data:`GROUPS` files). When a shard is first asked for, its group is read back, and
each of its shards is sorted into the order the whole split's list had (by class, then as
listed: a local folder's walk, an object store's keys; unlabelled images by path) and written
to a file of its own. The split's own order (for the dataset's fingerprint) is an external sort
of its sorted shards: runs, merged a batch of each at a time. So the driver holds a few batches
and a group of shards (a split's 1/32, or one shard when there are fewer), never the dataset;
with the images per shard held (more shards for more images, as docs/scaling.md plans), its
memory does not grow with the images (``benchmarks/planning_memory.py``). Its disk holds the
rows' bytes two or three times over.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.extract_shard import IMAGES, Images

# The planned images' columns: an image's and ``order``, what sorts it within its class as the
# listing was (storage.filesystem.LISTED's ``order``; for an unlabelled image its relative path
# first). While waiting to be sorted, a row also carries its shard.
PLANNED = IMAGES.append(pa.field("order", pa.binary()))
_SPILLED = PLANNED.append(pa.field("shard", pa.int32()))
SORT_KEYS = [("label_index", "ascending"), ("order", "ascending")]
BUFFER_ROWS = 1 << 16  # rows held before they are spilled to their groups' files
GROUPS = 32  # a split's shards are spilled to this many files (shard % GROUPS), all kept open
MERGE_FAN_IN = 32  # sorted files merged at once; more are merged in rounds, through files
MERGE_ROWS = 1 << 16  # rows a merge holds in all: a batch of each file it merges,
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
        table = _read(self.path).drop_columns(["order"])
        images = Images(table, self.labels, self.root)
        return images if self.classes == self.labels else images.relabel(self.classes)


class PlannedImages:
    """The images of a dataset's ``splits``, each cut into ``shards`` by the caller as it adds
    them (:meth:`add`; then :meth:`close`), for :meth:`shard` and :meth:`merged` to read back
    in order. The driver holds :data:`BUFFER_ROWS` rows while adding, a group of shards
    (``shard % min(shards, GROUPS)``: a split's 1/32, or one shard) while sorting them, and a
    merge's batches (or one run of at most :data:`MERGE_ROWS`) while merging."""

    def __init__(
        self, labels: tuple[str, ...], root: str, splits: tuple[str, ...], shards: int
    ) -> None:
        self.labels, self.root, self.splits, self.shards = labels, root, splits, shards
        self.groups = min(shards, GROUPS)
        self._keep = tempfile.TemporaryDirectory(prefix="wf-plan-")
        self._buffer: dict[tuple[str, int], list[pa.Table]] = {}
        self._buffered = 0
        self._open: dict[tuple[str, int], tuple[pa.NativeFile, Any]] = {}
        self._closed = False  # every image added: from here on, read only
        self._spilled: set[tuple[str, int]] = set()  # groups with rows not yet sorted
        self._sorted: dict[tuple[str, int], str] = {}
        self._sizes: dict[str, np.ndarray] = {s: np.zeros(shards, np.int64) for s in splits}
        # Images of each split per class; the last place counts unlabelled images.
        self._classes = {s: np.zeros(len(labels) + 1, np.int64) for s in splits}

    def add(self, split: str, rows: pa.Table, shards: np.ndarray) -> None:
        """Rows of :data:`PLANNED` for ``split``, each to the shard ``shards`` names."""
        if self._closed:
            raise RuntimeError("planned images take no more rows once they are read (closed)")
        groups = shards % self.groups
        order = np.argsort(groups, kind="stable")
        bounds = np.cumsum(np.bincount(groups, minlength=self.groups))
        rows = rows.append_column("shard", pa.array(shards, pa.int32()))
        for group, (start, end) in enumerate(zip([0, *bounds[:-1]], bounds, strict=True)):
            if start < end:
                self._buffer.setdefault((split, group), []).append(rows.take(order[start:end]))
        self._sizes[split] += np.bincount(shards, minlength=self.shards)
        index = rows.column("label_index").to_numpy()  # -1, unlabelled, counts last
        self._classes[split] += np.bincount(np.where(index < 0, len(self.labels), index),
                                            minlength=len(self.labels) + 1)  # fmt: skip
        self._buffered += rows.num_rows
        if self._buffered >= BUFFER_ROWS:
            self.flush()

    def flush(self) -> None:
        """Spill what is held to its groups' files."""
        for key, pieces in self._buffer.items():
            if key not in self._open:
                sink = pa.OSFile(self._group_path(key), "wb")
                self._open[key] = (sink, pa.ipc.new_stream(sink, _SPILLED))
            for piece in pieces:
                self._open[key][1].write_table(piece)
            self._spilled.add(key)
        self._buffer, self._buffered = {}, 0

    def close(self) -> None:
        """Spill what is held and close the files: every image has been added (or planning
        failed)."""
        try:
            self.flush()
        finally:
            for sink, writer in self._open.values():
                writer.close()
                sink.close()
            self._open, self._closed = {}, True

    def _group_path(self, key: tuple[str, int]) -> str:
        return f"{self._keep.name}/{key[0]}-group{key[1]}.arrow"

    def size(self, split: str, shard: int) -> int:
        return int(self._sizes[split][shard])

    def split_size(self, split: str, classes: tuple[str, ...] | None = None) -> int:
        """The images of ``split``, of ``classes`` only (and every unlabelled one) when given."""
        counts = self._classes[split]
        if classes is None:
            return int(counts.sum())
        return int(counts[self._kept(classes)].sum() + counts[-1])

    def _kept(self, classes: tuple[str, ...]) -> np.ndarray:
        """The indices (in :attr:`labels`) of ``classes``."""
        return np.array([i for i, label in enumerate(self.labels) if label in classes], np.int32)

    def _of(self, rows: pa.Table, classes: tuple[str, ...] | None) -> pa.Table:
        """``rows`` of ``classes`` only (and every unlabelled one), or all without them."""
        if classes is None or classes == self.labels:
            return rows
        index = rows.column("label_index")
        kept = pc.is_in(index, value_set=pa.array(self._kept(classes)))
        return rows.filter(pc.or_(kept, pc.less(index, 0)))

    def class_counts(self, split: str) -> np.ndarray:
        """Images of ``split`` per class (in :attr:`labels`' order)."""
        return self._classes[split][:-1]

    def shard(self, split: str, shard: int, classes: tuple[str, ...] | None = None) -> ShardRef:
        """The shard, sorted, as a reference that loads its images (of ``classes`` only, when
        given, and every unlabelled one). The first shard asked for of a group sorts the whole
        group's, each written to its own file."""
        key = (split, shard)
        if key not in self._sorted:
            self._sort_group(split, shard % self.groups)
        classes = self.labels if classes is None else classes
        count = self.size(split, shard)
        if classes != self.labels:  # rare (classes dropped): count what is kept
            count = self._of(_read(self._sorted[key]), classes).num_rows
        return ShardRef(self._sorted[key], self.labels, classes, self.root, count)

    def _sort_group(self, split: str, group: int) -> None:
        if not self._closed:
            raise RuntimeError("planned images are read once they are all added (close)")
        table = _SPILLED.empty_table()
        if (split, group) in self._spilled:
            with pa.OSFile(self._group_path((split, group))) as source:
                table = pa.ipc.open_stream(source).read_all()
        table = table.sort_by([("shard", "ascending"), *SORT_KEYS])
        counts = np.bincount(table.column("shard").to_numpy(), minlength=self.shards)
        start = 0
        for shard in range(group, self.shards, self.groups):  # the group's, in ascending order
            rows = table.slice(start, counts[shard]).drop_columns(["shard"])
            start += counts[shard]
            path = f"{self._keep.name}/{split}-{shard}.sorted.arrow"
            _write_chunks(path, [rows])
            self._sorted[split, shard] = path
        del table
        if (split, group) in self._spilled:  # only once each shard has its sorted file
            self._spilled.discard((split, group))
            os.remove(self._group_path((split, group)))

    def merged(self, split: str, classes: tuple[str, ...] | None = None) -> Iterator[pa.Table]:
        """The split's rows (with ``order``; of ``classes`` only, and every unlabelled one, when
        given) in the order of the split's whole list, in chunks, as an external sort does it:
        its sorted shards are read :data:`MERGE_ROWS` rows' worth at a time and sorted together
        into runs (a shard that large is a run as it is; a split that small is one run, never
        written), and the runs merged :data:`MERGE_FAN_IN` at once (more in rounds, through
        files), holding a batch of each."""
        if not self._closed:
            raise RuntimeError("planned images are read once they are all added (close)")
        for chunk in self._merged(split):
            yield self._of(chunk, classes)

    def _merged(self, split: str) -> Iterator[pa.Table]:
        made: list[str] = []  # the runs' and rounds' files, removed once read

        def to_file(chunks: Iterable[pa.Table]) -> str:
            path = f"{self._keep.name}/{split}-run-{len(made)}.arrow"
            _write_chunks(path, chunks)
            made.append(path)
            return path

        def run(paths: list[str]) -> str:
            if len(paths) == 1:  # a shard is sorted already
                return paths[0]
            return to_file([_sorted_together(paths)])

        runs, pending, held = [], [], 0
        for shard in range(self.shards):
            path, rows = self.shard(split, shard).path, self.size(split, shard)
            if pending and held + rows > MERGE_ROWS:
                runs.append(run(pending))
                pending, held = [], 0
            pending.append(path)
            held += rows
        if not runs and len(pending) > 1:  # the whole split fits in one run: sorted here
            for part in _sorted_together(pending).to_batches(max_chunksize=_merge_batch()):
                yield pa.Table.from_batches([part])
            return
        runs.append(run(pending))
        while len(runs) > MERGE_FAN_IN:
            merged_runs = []
            for start in range(0, len(runs), MERGE_FAN_IN):
                group = runs[start : start + MERGE_FAN_IN]
                merged_runs.append(to_file(_merge(group)) if len(group) > 1 else group[0])
                for used in set(group) & set(made) - set(merged_runs):
                    os.remove(used)
            runs = merged_runs
        try:
            yield from _merge(runs)
        finally:
            for used in set(runs) & set(made):
                os.remove(used)

    def images(self, split: str, classes: tuple[str, ...] | None = None) -> Images:
        """The whole split in memory, in its order (for small datasets and tests)."""
        chunks = list(self.merged(split, classes))
        table = pa.concat_tables(chunks) if chunks else PLANNED.empty_table()
        images = Images(table.drop_columns(["order"]), self.labels, self.root)
        return images if classes is None or classes == self.labels else images.relabel(classes)


def _read(path: str) -> pa.Table:
    with pa.OSFile(path) as source:
        return pa.ipc.open_file(source).read_all()


def _sorted_together(paths: list[str]) -> pa.Table:
    """The rows of the files ``paths``, in memory, in one order."""
    return pa.concat_tables([_read(p) for p in paths]).sort_by(SORT_KEYS)


def _merge_batch() -> int:
    """The rows of a batch in the sorted files: what a merge reads of each at once."""
    return max(MERGE_MIN_BATCH, MERGE_ROWS // MERGE_FAN_IN)


def _write_chunks(path: str, chunks: Iterable[pa.Table]) -> None:
    """Write ``chunks`` to ``path`` in batches of about :func:`_merge_batch` rows (small chunks
    joined)."""
    batch = _merge_batch()
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, PLANNED) as writer:
        held: list[pa.Table] = []
        for chunk in chunks:
            held.append(chunk)
            if sum(t.num_rows for t in held) >= batch:
                writer.write_table(pa.concat_tables(held), max_chunksize=batch)
                held = []
        if held:
            writer.write_table(pa.concat_tables(held), max_chunksize=batch)


def _merge(paths: list[str]) -> Iterator[pa.Table]:
    """The rows of the sorted files ``paths`` in one order, a chunk at a time."""
    streams = [_batches(p) for p in paths]
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
