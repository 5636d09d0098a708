"""Watches a ``wf`` process and, once it is gone, ends every process it started.

Ray's local cluster outlives a ``wf`` killed with SIGKILL: the GCS and raylet follow their
parent, but the dashboard and runtime-env agents and idle workers linger for a minute or more.
``wf`` starts this watcher, in a session of its own, when it starts a local cluster; the
watcher notes the descendants of ``wf`` every half second and kills those still there when
``wf`` exits or dies. Linux only (``/proc``); elsewhere it returns at once.

Run as ``python -m workflows.reaper PID``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def _processes() -> dict[int, tuple[int, str]]:
    """``{pid: (parent pid, start time)}`` of every process."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            out[int(stat.parent.name)] = (int(fields[1]), fields[19])
        except (OSError, ValueError, IndexError):
            continue
    return out


def descendants(pid: int, table: dict[int, tuple[int, str]]) -> dict[int, str]:
    """``{pid: start time}`` of every process under ``pid``."""
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, queue = {}, [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found[child] = table[child][1]
            queue.append(child)
    return found


def watch(pid: int, interval_s: float = 0.5) -> int:
    """Block while ``pid`` lives, then kill what it started; returns how many were killed."""
    if not Path("/proc").is_dir():
        return 0
    seen: dict[int, str] = {}
    me = os.getpid()
    while True:
        table = _processes()
        if pid not in table:
            break
        seen.update({p: t for p, t in descendants(pid, table).items() if p != me})
        time.sleep(interval_s)
    killed = 0
    table = _processes()
    for child, started in seen.items():
        if child in table and table[child][1] == started:  # the same process, not a reused pid
            try:
                os.kill(child, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


if __name__ == "__main__":
    watch(int(sys.argv[1]))
