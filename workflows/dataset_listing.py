"""A dataset's folder listed once without holding it: the rows go to a spill file on the
driver's disk as they are listed, and what deciding the dataset's shape needs (its folders, how
many files lie directly in each of the top two levels) is kept beside.

At ten million images a listing held in memory was gigabytes on the driver before the first
task ran (docs/scaling.md); here the driver holds one batch of rows at a time, and its folders.
The spill (an Arrow IPC file, about 60-100 bytes an image) lies under the temporary folder
(``TMPDIR``) and is removed when the listing is let go.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from storage.errors import DatasetError
from storage.filesystem import LISTED, Location, os_bytes, os_name
from tasks.images import is_ignored_file

SPILL_ROWS = 16_384  # rows listed between writes: the driver's only per-image memory
DIRECT_DEPTH = 2  # folders this deep below the listed one count the files they directly hold


@dataclass(frozen=True, eq=False)
class Listing:
    """Every file under a folder (``location``), spilled in batches of :data:`LISTED` as they
    were listed, and the folders; ``prefix`` names the one folder below it this listing stands
    for (a dataset inside a folder of datasets), whose rows are read with the prefix taken off.

    ``direct`` counts the files directly in each folder down to :data:`DIRECT_DEPTH` levels
    (``()`` is the folder itself); ``batches`` says which spill batches hold files under each
    top-level name, so that a dataset in a folder of datasets reads its own batches only."""

    location: Location
    spill: str
    folders: frozenset[tuple[str, ...]]
    direct: dict[tuple[str, ...], int]
    batches: dict[bytes, tuple[int, ...]]
    prefix: str | None = None
    _keep: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def children(self) -> list[str]:
        return sorted({f[0] for f in self.folders})

    def loose_files(self, *folder: str) -> int:
        """How many files lie directly in ``folder`` (default: this one)."""
        return self.direct.get(tuple(folder), 0)

    def sub(self, name: str) -> Listing:
        """The listing of the folder ``name`` directly below this one (of a top-level listing)."""
        if self.prefix is not None:
            raise ValueError("a sub-listing has no sub-listings")
        location = self.location
        inside = Location(location.filesystem, location.path(name), f"{location.uri}/{name}")
        folders = frozenset(f[1:] for f in self.folders if f[0] == name and len(f) > 1)
        direct = {k[1:]: n for k, n in self.direct.items() if k and k[0] == name}
        return Listing(inside, self.spill, folders, direct, self.batches, name, self._keep)

    def rows(self) -> Iterator[pa.RecordBatch]:
        """The listed files, a spill batch at a time, in the order they were listed (each
        file's parts below this listing's folder)."""
        with pa.OSFile(self.spill) as source:
            reader = pa.ipc.open_file(source)
            if self.prefix is None:
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
                return
            name = os_bytes(self.prefix)
            for i in self.batches.get(name, ()):
                batch = reader.get_batch(i)
                parts = batch.column("parts")
                inside = pc.and_(pc.equal(pc.list_element(parts, 0), pa.scalar(name)),
                                 pc.greater(pc.list_value_length(parts), 1))  # fmt: skip
                batch = batch.filter(inside)
                below = pc.list_slice(batch.column("parts"), 1).cast(LISTED.field("parts").type)
                yield batch.set_column(0, "parts", below)


def list_folder(where: str) -> Listing:
    """List ``where`` into a spill, or :class:`DatasetError` when it is no folder."""
    location = Location.at(where)
    if location.kind() != "folder":  # file_info retries a store that stops answering
        raise DatasetError(f"{where} is not a folder")
    keep = tempfile.TemporaryDirectory(prefix="wf-listing-")
    spill = f"{keep.name}/listing.arrow"
    folders: set[tuple[str, ...]] = set()
    direct: Counter[tuple[bytes, ...]] = Counter()
    batches: dict[bytes, list[int]] = {}
    rows: list[tuple] = []
    written = [0]  # batches in the spill
    with pa.OSFile(spill, "wb") as sink, pa.ipc.new_file(sink, LISTED) as writer:

        def flush() -> None:
            columns = zip(*rows, strict=True)
            arrays = [pa.array(c, f.type) for c, f in zip(columns, LISTED, strict=True)]
            for first in {row[0][0] for row in rows}:
                batches.setdefault(first, []).append(written[0])
            writer.write_batch(pa.record_batch(arrays, schema=LISTED))
            written[0] += 1
            rows.clear()

        for row in location.files(is_ignored_file, folders):
            parts = row[0]
            if len(parts) <= DIRECT_DEPTH + 1:
                direct[tuple(parts[:-1])] += 1
            rows.append(row)
            if len(rows) == SPILL_ROWS:
                flush()
        if rows:
            flush()
    return Listing(location, spill, frozenset(folders),
                   {tuple(os_name(p) for p in k): n for k, n in direct.items()},
                   {k: tuple(v) for k, v in batches.items()}, None, keep)  # fmt: skip
