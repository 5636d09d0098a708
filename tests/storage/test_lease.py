"""One writer per store: the lease, on a local folder (the same checks on an S3 server are in
tests/workflows/test_clustered.py, through :func:`race` and :func:`refuse_second`)."""

import json
import os
import subprocess
import sys
import threading
import time

import pyarrow.fs as pafs
import pytest

from storage.errors import StoreBusyError
from storage.lease import Lease, LeaseRecord, is_stale


def _lease(tmp_path, **kwargs) -> Lease:
    return Lease(pafs.LocalFileSystem(), str(tmp_path / "_lease.json"), "store d/bb", **kwargs)


def refuse_second(filesystem: pafs.FileSystem, path: str) -> None:
    """A lease held on ``path``: a second writer is refused in one line naming the holder, and
    once it is released the next writer takes it."""
    with Lease(filesystem, path, "store d/bb", command="wf extract"):
        record = json.loads(filesystem.open_input_stream(path).read())
        assert record["pid"] == os.getpid() and record["command"] == "wf extract"
        with pytest.raises(StoreBusyError) as caught:
            Lease(filesystem, path, "store d/bb").acquire()
        message = str(caught.value)
        assert "store d/bb is being written by wf extract" in message and "--wait" in message
        assert f"pid {os.getpid()}" in message and "\n" not in message
    assert filesystem.get_file_info(path).type == pafs.FileType.NotFound  # released
    with Lease(filesystem, path, "store d/bb"):
        pass


def race(filesystem: pafs.FileSystem, path: str, writers: int = 4) -> None:
    """``writers`` threads take the lease at the same instant: exactly one holds it, and every
    other is refused naming a writer."""
    leases = [Lease(filesystem, path, f"store d/bb ({i})", command=f"writer {i}")
              for i in range(writers)]  # fmt: skip
    start = threading.Barrier(writers)
    won, refused = [], []

    def take(lease: Lease) -> None:
        start.wait()
        try:
            lease.acquire()
            won.append(lease)
        except StoreBusyError as error:
            refused.append(str(error))

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(won) == 1 and len(refused) == writers - 1, (won, refused)
    holder = won[0].read()
    assert holder is not None and holder.owner == won[0].owner
    # Each loser names the holder it read, which in the race may be a writer that lost later.
    assert all("is being written by writer " in message for message in refused), refused
    won[0].release()


def test_a_second_writer_is_refused_in_one_line_naming_the_holder(tmp_path):
    refuse_second(pafs.LocalFileSystem(), str(tmp_path / "_lease.json"))


def test_writers_racing_for_one_lease_leave_exactly_one_holder(tmp_path):
    for round_ in range(3):
        race(pafs.LocalFileSystem(), str(tmp_path / f"_lease{round_}.json"))


def test_wait_takes_the_lease_once_the_holder_releases_it(tmp_path):
    holder = _lease(tmp_path)
    holder.__enter__()
    messages = []
    threading.Timer(0.5, holder.release).start()
    started = time.perf_counter()
    with _lease(tmp_path, wait=True, poll_s=0.1, on_wait=messages.append):
        assert time.perf_counter() - started >= 0.4
    assert len(messages) == 1 and "held by" in messages[0]


def test_a_dead_holder_of_this_host_is_taken_over_at_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    import socket

    now = time.time()
    record = LeaseRecord(
        "someone", socket.gethostname(), int(dead.stdout), "wf extract", now, now, 3600
    )
    (tmp_path / "_lease.json").write_text(json.dumps(record.__dict__))
    assert is_stale(record, now)
    with _lease(tmp_path) as lease:
        assert json.loads((tmp_path / "_lease.json").read_text())["owner"] == lease.owner


def test_a_holder_on_another_host_is_stale_only_after_its_time_to_live(tmp_path):
    now = time.time()
    record = LeaseRecord("someone", "elsewhere", 1, "wf extract", now, now, 60)
    assert not is_stale(record, now + 59) and is_stale(record, now + 61)
    (tmp_path / "_lease.json").write_text(json.dumps(record.__dict__))
    with pytest.raises(StoreBusyError, match="on elsewhere"):
        _lease(tmp_path).acquire()


def test_a_holder_that_lost_its_lease_stops_at_its_next_check(tmp_path):
    lease = _lease(tmp_path)
    with lease:
        lease.check()
        now = time.time()
        other = LeaseRecord("other", "elsewhere", 1, "wf extract", now, now, 60)
        (tmp_path / "_lease.json").write_text(json.dumps(other.__dict__))
        lease.renew()
        with pytest.raises(StoreBusyError, match=r"lost the lease .* to wf extract on elsewhere"):
            lease.check()
    # It does not delete a lease it no longer holds.
    assert json.loads((tmp_path / "_lease.json").read_text())["owner"] == "other"
