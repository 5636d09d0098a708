"""The rejects table: every image a store could not use, with its reason, as Parquet."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from storage.filesystem import write_stream
from storage.layout import StoreLayout
from storage.manifest import Manifest

REJECTS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("split", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


def write_rejects(layout: StoreLayout, manifest: Manifest) -> str:
    """Write ``rejects.parquet`` from the manifest's records; returns its path."""
    table = pa.Table.from_pylist(
        [{"path": r.path, "split": r.split, "reason": r.reason, "detail": r.detail}
         for r in manifest.rejects],
        schema=REJECTS_SCHEMA,
    )  # fmt: skip
    path = layout.rejects_path(manifest.dataset, manifest.backbone)
    write_stream(layout.filesystem, path, lambda stream: pq.write_table(table, stream))
    return path
