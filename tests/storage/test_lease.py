"""One writer per store: the lease, on a local folder (the object-store case is in
tests/workflows/test_object_store.py)."""

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


def test_a_second_writer_is_refused_in_one_line_naming_the_holder(tmp_path):
    with _lease(tmp_path, command="wf extract"):
        record = json.loads((tmp_path / "_lease.json").read_text())
        assert record["pid"] == os.getpid() and record["command"] == "wf extract"
        with pytest.raises(StoreBusyError) as caught:
            _lease(tmp_path).acquire()
        message = str(caught.value)
        assert "store d/bb is being written by wf extract" in message and "--wait" in message
        assert f"pid {os.getpid()}" in message and "\n" not in message
    assert not (tmp_path / "_lease.json").exists()  # released
    with _lease(tmp_path):
        pass


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
