"""One writer per store: a lease file that works on a local path and on an object store.

``_lease.json`` names its holder (a random owner id, host, pid, command), when it started and
when it was last renewed. The holder renews it from a background thread every quarter of its
time to live, and checks on each renewal that the file still names it.

Taking a lease: read it; if a live holder has it, refuse in one line (or, with ``wait``, poll
until it is free). A holder is dead when its renewal is older than its time to live, or at once
when it ran on this host and its process is gone (a killed ``wf``). Then write our record, wait
a moment (``settle``) and read it back: of two writers that raced, the later write wins and
the other sees it and backs off. Object stores have no compare-and-swap through ``pyarrow.fs``,
so this read-back is the guard there; a holder that later finds another owner in the file stops
at its next commit (:meth:`Lease.check`), before it writes anything the manifest would name.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import pyarrow.fs as pafs

from storage.errors import StoreBusyError
from storage.filesystem import delete_file, file_info, is_local, read_bytes, write_bytes


@dataclass(frozen=True)
class LeaseRecord:
    owner: str
    host: str
    pid: int
    command: str
    started_at: float
    renewed_at: float
    ttl_s: float

    def describe(self) -> str:
        since = datetime.fromtimestamp(self.started_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{self.command} on {self.host} (pid {self.pid}) since {since}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    try:  # a killed process nobody has reaped yet (a zombie) is dead too
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def is_stale(record: LeaseRecord, now: float) -> bool:
    """A dead holder: not renewed within its time to live, or a process of this host gone."""
    if record.host == socket.gethostname() and not _pid_alive(record.pid):
        return True
    return now - record.renewed_at > record.ttl_s


class Lease:
    """The lease at ``path`` for ``what`` (a store's name, for messages). Use as a context
    manager: taken on entry, renewed while held, released on exit."""

    def __init__(
        self,
        filesystem: pafs.FileSystem,
        path: str,
        what: str,
        command: str = "wf",
        ttl_s: float = 60.0,
        wait: bool = False,
        poll_s: float = 2.0,
        on_wait: callable | None = None,  # type: ignore[valid-type]
    ) -> None:
        self.filesystem, self.path, self.what = filesystem, path, what
        self.command, self.ttl_s, self.wait, self.poll_s = command, ttl_s, wait, poll_s
        self.on_wait = on_wait
        self.owner = uuid.uuid4().hex
        self.settle_s = 0.05 if is_local(filesystem) else 1.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def read(self) -> LeaseRecord | None:
        if file_info(self.filesystem, self.path) is None:
            return None
        try:
            return LeaseRecord(**json.loads(read_bytes(self.filesystem, self.path)))
        except (ValueError, TypeError, FileNotFoundError):
            return None  # half-written by a dead holder, or just deleted: nobody holds it

    def _write(self) -> None:
        now = time.time()
        record = LeaseRecord(
            self.owner, socket.gethostname(), os.getpid(), self.command,
            self._started or now, now, self.ttl_s,
        )  # fmt: skip
        write_bytes(self.filesystem, self.path, json.dumps(asdict(record)).encode())

    def acquire(self) -> None:
        waited = False
        while True:
            holder = self.read()
            if holder is None or holder.owner == self.owner or is_stale(holder, time.time()):
                self._started = time.time()
                self._write()
                time.sleep(self.settle_s)
                holder = self.read()
                if holder is not None and holder.owner == self.owner:
                    return
            assert holder is not None
            if not self.wait:
                raise StoreBusyError(
                    f"{self.what} is being written by {holder.describe()}; "
                    "wait for it to finish or pass --wait"
                )
            if not waited and self.on_wait is not None:
                self.on_wait(f"waiting for {self.what}: held by {holder.describe()}")
            waited = True
            time.sleep(self.poll_s)

    def renew(self) -> None:
        """Renew the lease, or note that it was lost (another writer's record is there)."""
        holder = self.read()
        if holder is None or holder.owner != self.owner:
            self._lost = holder.describe() if holder else "nobody (the lease file was removed)"
            return
        self._write()

    def check(self) -> None:
        """Raise if the lease was lost; call before anything the manifest will name."""
        if self._lost is not None:
            raise StoreBusyError(f"lost the lease on {self.what} to {self._lost}; stopping")

    def _renew_forever(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.renew()
            except Exception:  # a missed renewal is retried; expiry is the limit
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self.read()
        if holder is not None and holder.owner == self.owner:
            delete_file(self.filesystem, self.path)

    def __enter__(self) -> Lease:
        self.acquire()
        self._thread = threading.Thread(target=self._renew_forever, daemon=True, name="wf-lease")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
