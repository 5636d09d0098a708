"""Every byte wf reads or writes goes through here: local paths and object-store URIs alike.

A :class:`Location` is a folder on a filesystem that ``pyarrow.fs`` opens: a local path, or a
URI such as ``s3://bucket/prefix`` or ``gs://bucket/prefix``. Credentials and the endpoint come
from the standard environment of the cloud's SDK (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION`` ...), read by the SDK
itself: wf never holds a secret, so none is pickled to a worker or written to a file.

Writes are atomic for readers. On a local filesystem the bytes go to a hidden temporary sibling
(``.NAME.tmp-UUID``) that is renamed into place; an object store makes an object visible only
once its upload completes, so there the final name is written directly (no rename exists).
Calls to an object store are retried with exponential backoff on network and 5xx errors; when
the retries are spent the error is one line.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import struct
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from storage.errors import StoreError
from storage.hashing import sha256_stream

T = TypeVar("T")
TEMPORARY_MARK = ".tmp-"
_TRANSIENT = (
    "NETWORK_CONNECTION", "Couldn't connect", "Connection refused", "onnection reset",
    "timed out", "Timeout", "SERVICE_UNAVAILABLE", "Service Unavailable", "SLOW_DOWN",
    "INTERNAL_FAILURE", "HTTP response code: 5", "curlCode",
)  # fmt: skip


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for object-store calls: ``attempts`` tries, the delay doubling up to a cap."""

    attempts: int = 10
    first_delay_s: float = 0.25
    max_delay_s: float = 8.0


RETRY = RetryPolicy()  # about 40 s of retries before a call gives up


def is_local(filesystem: pafs.FileSystem) -> bool:
    return isinstance(filesystem, pafs.LocalFileSystem)


def _transient(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, OSError) and any(mark in text for mark in _TRANSIENT)


def retrying(filesystem: pafs.FileSystem, call: Callable[[], T], policy: RetryPolicy = RETRY) -> T:
    """``call()``, retried with backoff while an object store reports a transient error."""
    if is_local(filesystem):
        return call()
    delay = policy.first_delay_s
    for attempt in range(policy.attempts):
        try:
            return call()
        except OSError as error:
            if not _transient(error):
                raise
            if attempt == policy.attempts - 1:
                raise StoreError(
                    f"the object store did not answer after {policy.attempts} tries: "
                    f"{first_line(error)}"
                ) from error
            time.sleep(delay)
            delay = min(delay * 2, policy.max_delay_s)
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class Location:
    """A folder: ``filesystem`` and ``root`` as pyarrow names them, ``uri`` as the user did."""

    filesystem: pafs.FileSystem
    root: str
    uri: str

    @classmethod
    def at(cls, where: str) -> Location:
        if not is_uri(where):
            path = os.path.abspath(os.path.expanduser(where))
            return cls(pafs.LocalFileSystem(), path, path)
        try:
            filesystem, root = pafs.FileSystem.from_uri(_with_delayed_open(where))
        except (pa.ArrowInvalid, OSError, ValueError) as error:
            raise StoreError(f"cannot open {where}: {first_line(error)}") from None
        return cls(filesystem, root.rstrip("/"), where.rstrip("/"))

    @property
    def is_local(self) -> bool:
        return is_local(self.filesystem)

    def path(self, *parts: str) -> str:
        """A path under the root, as the filesystem names it."""
        return posixpath.join(self.root, *parts) if parts else self.root

    def display(self, path: str) -> str:
        """``path`` as a person would write it (with the URI's scheme)."""
        if self.is_local:
            return path
        scheme = self.uri.split("://", 1)[0]
        return f"{scheme}://{path}"

    def relative(self, path: str) -> str:
        return posixpath.relpath(path, self.root)

    def kind(self, path: str | None = None) -> str:
        """``"folder"``, ``"file"`` or ``"missing"``: what ``path`` (default: the root) is."""
        path = self.root if path is None else path
        if self.is_local:  # a link to a folder is a folder, a dangling link a file (its error)
            return (
                "folder" if os.path.isdir(path) else "file" if os.path.lexists(path) else "missing"
            )
        info = file_info(self.filesystem, path)
        if info is None:
            return "missing"
        return "folder" if info.type == pafs.FileType.Directory else "file"

    def tree(self, ignored: Callable[[str], bool]) -> tuple[pa.Table, set[tuple[str, ...]]]:
        """Every file under the root as the columns of :data:`LISTING` (its parts below the
        root, its path where the parts do not spell it, size and mtime) and every folder (its
        parts), names ``ignored`` skipped with all below them, in :meth:`files`' order (an
        object store's sorted by key). An object store has no empty folders: only those that
        hold a file are seen. The files are held as Arrow batches, never a Python object each:
        at ten million images those were 12-34 GB on the driver (docs/scaling.md); a dataset
        being extracted is not held at all (:mod:`workflows.dataset_listing`)."""
        files, folders = ColumnBuilder(LISTED), set()
        for row in self.files(ignored, folders):
            files.append(*row)
        table = files.table()
        if not self.is_local:  # sorted by key below the root
            table = table.take(pc.array_sort_indices(table.column("order")))
        return table.drop_columns(["order"]), folders

    def files(
        self, ignored: Callable[[str], bool], folders: set[tuple[str, ...]]
    ) -> Iterator[tuple[list[bytes], bytes | None, int, int, bytes]]:
        """Every file under the root as it is listed, one row of :data:`LISTED` at a time
        (nothing is held), and every folder into ``folders``; names ``ignored`` are skipped
        with all below them. A local folder is walked in order (each folder's files sorted,
        then its folders, each in turn), ``order`` counting the files; an object store is
        listed by prefixes in parallel, in no order, ``order`` being the key below the root
        (the parts joined, or the key's own text where the parts do not spell it: "a/./z"
        sorts before "a/b")."""
        if self.is_local:  # one walk gives the folders and the files, each path root/parts
            below = len(os.path.join(self.root, ""))  # the walk's paths are the root's and more
            for n, (path, stat) in enumerate(walk_local(self.root, ignored, folders)):
                parts = path[below:].split(os.sep)
                yield [os_bytes(p) for p in parts], None, *stat_signature(stat), _ORDER.pack(n)
            return
        prefix = f"{self.root}/"
        for listed in _listings(self.filesystem, self.root, LIST_THREADS):
            for entry in listed:
                if entry.type != pafs.FileType.File:
                    continue
                relative = posixpath.relpath(entry.path, self.root)
                parts = tuple(relative.split("/"))
                if any(ignored(p) for p in parts):
                    continue
                # A key that relpath normalises ("a//b", "a/./b") keeps its own path.
                usual = entry.path == f"{prefix}{relative}"
                key = entry.path[len(prefix) :] if entry.path.startswith(prefix) else relative
                yield ([p.encode() for p in parts], None if usual else entry.path.encode(),
                       *stat_signature(entry), key.encode())  # fmt: skip
                folders.update(parts[:i] for i in range(1, len(parts)))

    def move(self, source: str, target: str) -> None:
        """Move a file: a rename on a local disk, copy then delete on an object store."""
        fs = self.filesystem
        if self.is_local:
            fs.create_dir(posixpath.dirname(target), recursive=True)
            fs.move(source, target)
            return
        retrying(fs, lambda: fs.copy_file(source, target))
        retrying(fs, lambda: fs.delete_file(source))

    def ensure_writable(self) -> None:
        """Create the root and prove a file can be written there, or one line saying why not."""
        probe = self.path(f".wf-probe{TEMPORARY_MARK}{uuid.uuid4().hex}")
        try:
            retrying(self.filesystem, lambda: self.filesystem.create_dir(self.root, recursive=True))
            write_bytes(self.filesystem, probe, b"")
            delete_file(self.filesystem, probe)
        except (OSError, pa.ArrowException) as error:
            raise StoreError(f"cannot write to {self.uri}: {first_line(error)}") from None


@dataclass(frozen=True)
class TreeFile:
    parts: tuple[str, ...]  # below the root
    path: str  # as the filesystem names it
    size: int
    mtime_ns: int


# A listing's columns. Names are bytes: a local name that is not UTF-8 keeps its bytes (Python
# gives it surrogate-escaped, which an Arrow string cannot hold); see os_bytes and os_name.
# ``path`` is null where the file's path is the root and its parts joined by "/" (every local
# file, nearly every object): the root is not repeated for every file.
LISTING = pa.schema([("parts", pa.list_(pa.binary())), ("path", pa.binary()),
                     ("size", pa.int64()), ("mtime_ns", pa.int64())])  # fmt: skip
# A listing's rows as :meth:`Location.files` gives them: with ``order``, what sorts them as a
# listing of the whole folder is sorted (a local file's place in the walk, 8 bytes big-endian;
# an object's key below the root).
LISTED = LISTING.append(pa.field("order", pa.binary()))
_ORDER = struct.Struct(">Q")


def os_bytes(name: str) -> bytes:
    """A name as Python's ``os`` gives it (surrogate-escaped where not UTF-8) as its bytes."""
    return name.encode("utf-8", "surrogateescape")


def os_name(data: bytes) -> str:
    """The inverse of :func:`os_bytes`."""
    return data.decode("utf-8", "surrogateescape")


_PANDAS_PROBED = False


class _NoPandas:
    """An import finder under which ``import pandas`` fails (see :func:`skip_pandas_probe`)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.partition(".")[0] == "pandas":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def skip_pandas_probe() -> None:
    """Spare this process pandas' import, for a process that never hands pyarrow a pandas
    object (``wf extract``'s own). The first time pyarrow turns Python values into an array it
    imports pandas (0.2-0.3 s here), only to ask whether the values are pandas objects. That
    first question is asked here with pandas out of reach, so pyarrow notes "no pandas" and
    goes on. From then on pyarrow's checks for pandas values (``pa.array`` of a Series, a
    timestamp's ``as_py``) answer no until something calls a conversion that requires pandas
    (``Table.to_pandas``, ``Table.from_pandas``), which imports it and puts them right: so a
    Ray worker, which may serve other work of the same job (the demo's training), never calls
    this. Nothing to do in a process that has pandas already, or has asked before."""
    import sys

    global _PANDAS_PROBED
    if "pandas" in sys.modules or _PANDAS_PROBED:
        return
    _PANDAS_PROBED = True
    finder = _NoPandas()
    sys.meta_path.insert(0, finder)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(finder)


class ColumnBuilder:
    """Rows appended one at a time, kept as Arrow record batches of ``batch_rows``: a Python
    object per row only for the batch being filled."""

    def __init__(self, schema: pa.Schema, batch_rows: int = 16_384) -> None:
        self.schema, self._batch_rows = schema, batch_rows
        self._rows: list[tuple[Any, ...]] = []
        self._batches: list[pa.RecordBatch] = []

    def append(self, *row: Any) -> None:
        self._rows.append(row)
        if len(self._rows) >= self._batch_rows:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            columns = zip(*self._rows, strict=True)
            arrays = [pa.array(c, f.type) for c, f in zip(columns, self.schema, strict=True)]
            self._batches.append(pa.record_batch(arrays, schema=self.schema))
            self._rows = []

    def table(self) -> pa.Table:
        self._flush()
        return pa.Table.from_batches(self._batches, self.schema)


def column_values(column: pa.ChunkedArray, batch_rows: int = 16_384) -> Iterator[Any]:
    """The values of ``column`` as Python objects, ``batch_rows`` of them made at a time."""
    for chunk in column.chunks:
        for start in range(0, len(chunk), batch_rows):
            yield from chunk.slice(start, batch_rows).to_pylist()


def column_rows(table: pa.Table, names: list[str], batch_rows: int = 4096) -> Iterator[tuple]:
    """The rows of ``table``'s columns ``names`` as tuples, ``batch_rows`` made at a time."""
    for batch in table.to_batches(max_chunksize=batch_rows):
        yield from zip(*(batch.column(n).to_pylist() for n in names), strict=True)


def _with_delayed_open(uri: str) -> str:
    """An ``s3://`` URI with ``allow_delayed_open=true`` (unless it says otherwise): a small
    object is then one PUT when its stream closes, not a multipart upload begun at open (three
    round trips), which made every shard commit three times slower against a remote store
    (benchmarks/listing_scale.py)."""
    if not uri.startswith("s3://") or "allow_delayed_open=" in uri:
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}allow_delayed_open=true"


def is_uri(where: str) -> bool:
    """Whether ``where`` names an object store or other filesystem by URI (``s3://...``)."""
    return "://" in where


def file_location(where: str) -> tuple[Location, str]:
    """The folder of the file ``where`` (a local path or a URI) and the file's path in it, as
    its filesystem names it."""
    if "://" in where:
        folder = posixpath.dirname(where)
    else:
        folder = os.path.dirname(os.path.abspath(os.path.expanduser(where)))
    location = Location.at(folder)
    return location, location.path(posixpath.basename(where))


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (at most 300 characters), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def file_info(filesystem: pafs.FileSystem, path: str) -> pafs.FileInfo | None:
    """The file or folder at ``path``, or None when there is none."""
    info = retrying(filesystem, lambda: filesystem.get_file_info(path))
    return None if info.type == pafs.FileType.NotFound else info


def list_files(
    filesystem: pafs.FileSystem, folder: str, recursive: bool = True, threads: int = 1
) -> list[pafs.FileInfo]:
    """Every file under ``folder`` (none when it does not exist), sorted by path.

    With ``threads`` > 1 on an object store, the listing runs in parallel by prefix: an object
    store lists a prefix one page of 1,000 keys after another, each page a round trip, so one
    listing of 10 million keys is 10,000 round trips in a row. Here the folder's sub-folders
    (down two levels, to a dataset's split and class prefixes) are listed ``threads`` at once.
    A local disk is listed in one call either way."""
    if recursive:
        infos = [i for listed in _listings(filesystem, folder, threads) for i in listed]
    else:
        selector = pafs.FileSelector(folder, recursive=False, allow_not_found=True)
        infos = retrying(filesystem, lambda: filesystem.get_file_info(selector))
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


LIST_THREADS = 16  # listings of one object store in flight at once (the driver's, while planning)


def _listings(
    filesystem: pafs.FileSystem, folder: str, threads: int
) -> Iterator[list[pafs.FileInfo]]:
    """Everything under ``folder`` (files and folders, unsorted), one listing at a time: one
    recursive listing, or on an object store with ``threads`` > 1 one per prefix."""

    def entries(prefix: str, recursive: bool) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(prefix, recursive=recursive, allow_not_found=True)
        return retrying(filesystem, lambda: filesystem.get_file_info(selector))

    if threads <= 1 or is_local(filesystem):
        yield entries(folder, True)
        return
    from concurrent.futures import ThreadPoolExecutor

    prefixes = [folder]
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(2):  # the folder's own level, then one more when it has few folders
            level = [
                i for listed in pool.map(lambda p: entries(p, False), prefixes) for i in listed
            ]
            yield [i for i in level if i.type == pafs.FileType.File]
            prefixes = [i.path for i in level if i.type == pafs.FileType.Directory]
            if len(prefixes) >= threads:
                break
        # At most ``threads`` listings in flight or waiting to be read: what the caller has not
        # yet turned into columns is a Python object per file.
        pending: deque = deque()
        for prefix in prefixes:
            if len(pending) == threads:
                yield pending.popleft().result()
            pending.append(pool.submit(entries, prefix, True))
        while pending:
            yield pending.popleft().result()


def list_folders(filesystem: pafs.FileSystem, folder: str) -> list[str]:
    """The names of the folders directly under ``folder``."""
    selector = pafs.FileSelector(folder, recursive=False, allow_not_found=True)
    infos = retrying(filesystem, lambda: filesystem.get_file_info(selector))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def read_bytes(filesystem: pafs.FileSystem, path: str) -> bytes:
    """The whole file. Local files are read by Python's ``open``, which takes any name a
    filesystem allows (pyarrow's local filesystem refuses names that are not UTF-8)."""
    if is_local(filesystem):
        with open(path, "rb") as handle:
            return handle.read()

    def read() -> bytes:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()

    return retrying(filesystem, read)


def write_stream(
    filesystem: pafs.FileSystem, path: str, write: Callable[[pa.NativeFile], None]
) -> None:
    """Write ``path`` through ``write(stream)`` so that readers see all of it or nothing."""
    local = is_local(filesystem)
    if local:  # an object store has no folders to make: a key's prefix needs no request
        folder = posixpath.dirname(path)
        retrying(filesystem, lambda: filesystem.create_dir(folder, recursive=True))
    target = temporary_name(path) if local else path
    try:
        with filesystem.open_output_stream(target) as stream:
            write(stream)
        if target != path:
            filesystem.move(target, path)
    except BaseException:
        # An object store completes even an upload that failed midway when the stream
        # closes; delete what it made visible, if it can now (else the next run will: no
        # manifest names it).
        with contextlib.suppress(Exception):
            filesystem.delete_file(target)
        raise


def write_bytes(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; on an object store, one retried PUT."""
    retrying(filesystem, lambda: write_stream(filesystem, path, lambda stream: stream.write(data)))


def table_bytes(table: pa.Table, file_format: str) -> bytes:
    """``table`` as the bytes of a ``parquet`` or ``csv`` file (quoting only where needed)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    if file_format == "parquet":
        pq.write_table(table, sink)
    else:
        pacsv.write_csv(table, sink, pacsv.WriteOptions(quoting_style="needed"))
    return sink.getvalue().to_pybytes()


def delete_file(filesystem: pafs.FileSystem, path: str) -> None:
    """Delete ``path`` if it is there."""

    def delete() -> None:
        with contextlib.suppress(FileNotFoundError):
            filesystem.delete_file(path)

    retrying(filesystem, delete)


def delete_folder(filesystem: pafs.FileSystem, folder: str) -> None:
    """Delete ``folder`` and everything in it, if it is there."""
    if file_info(filesystem, folder) is not None:
        retrying(filesystem, lambda: filesystem.delete_dir(folder))


def file_sha256(filesystem: pafs.FileSystem, path: str, chunk: int = 1 << 20) -> str:
    def digest() -> str:
        with filesystem.open_input_stream(path) as stream:
            return sha256_stream(iter(lambda: stream.read(chunk), b""))

    return retrying(filesystem, digest)


def temporary_name(path: str) -> str:
    """A hidden sibling of ``path``: Parquet readers skip names that start with a dot."""
    head, tail = posixpath.split(path)
    return posixpath.join(head, f".{tail}{TEMPORARY_MARK}{uuid.uuid4().hex}")


def remove_temporaries(filesystem: pafs.FileSystem, folder: str) -> int:
    """Delete the temporary files that killed runs left under ``folder``; call only while no
    other writer can be using it (holding its lease). Returns how many went."""
    stale = [
        info.path
        for info in list_files(filesystem, folder)
        if info.base_name.startswith(".") and TEMPORARY_MARK in info.base_name
    ]
    for path in stale:
        delete_file(filesystem, path)
    return len(stale)


def walk_local(
    root: str, ignored: Callable[[str], bool], seen: set[tuple[str, ...]] | None = None
) -> Iterator[tuple[str, os.stat_result]]:
    """``(path, stat)`` of every file under ``root``, sorted, skipping ``ignored`` names, and
    into ``seen`` (when given) every folder walked, as its parts below ``root``. Names that
    are not UTF-8 come back surrogate-escaped (Python's ``os`` convention)."""
    for current, folders, names in os.walk(root):
        folders[:] = sorted(f for f in folders if not ignored(f))
        if seen is not None:
            base = os.path.relpath(current, root)
            for folder in folders:
                seen.add(tuple(os.path.normpath(os.path.join(base, folder)).split(os.sep)))
        for name in sorted(names):
            if ignored(name):
                continue
            path = os.path.join(current, name)
            try:
                yield path, os.stat(path)
            except OSError:  # a dangling or looping symlink: the shard task says why
                yield path, os.lstat(path)


def stat_signature(info: Any) -> tuple[int, int]:
    """``(size, mtime in ns)`` of a pyarrow FileInfo or an ``os.stat_result``."""
    if isinstance(info, os.stat_result):
        return info.st_size, info.st_mtime_ns
    return int(info.size or 0), int(info.mtime_ns or 0)
