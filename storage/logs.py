"""Structured logs for machines: one JSON-lines file per run, written through storage."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from storage.filesystem import write_bytes
from storage.layout import StoreLayout
from storage.manifest import now_iso


def write_run_log(layout: StoreLayout, command: str, events: Iterable[dict[str, Any]]) -> str:
    """Write ``events`` (one JSON object each, timestamped) to a new log under ``_logs/``;
    returns its path."""
    path = layout.log_path(command)
    lines = [json.dumps({"at": now_iso(), **event}, default=str) for event in events]
    write_bytes(layout.filesystem, path, ("\n".join(lines) + "\n").encode())
    return path
