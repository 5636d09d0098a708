"""Parquet feature stores: the schema of a row, the atomic shard writer, and readers.

A row is one copy of one image: its content id, relative path, label, label index, split, copy
index (0 is the un-augmented image) and one fixed-size-list column per tap. Shapes and dtypes
are in the schema metadata, so any Parquet reader (pandas, polars, DuckDB,
``ray.data.read_parquet``) can open a part file and reshape the features.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.errors import StoreError
from storage.layout import StoreLayout, file_sha256, write_atomically
from storage.manifest import Manifest, TapRecord, read_manifest

FEATURE_DTYPES = ("float16", "float32")
_ARROW_DTYPES = {"float16": pa.float16(), "float32": pa.float32(), "uint8": pa.uint8()}
ROW_COLUMNS = ("image_id", "path", "label", "label_index", "split", "copy")
COMPRESSION = "zstd"


def tap_column(name: str) -> str:
    """The column that holds tap ``name``."""
    return f"tap_{name}"


def feature_schema(taps: Mapping[str, TapRecord], classes: Iterable[str]) -> pa.Schema:
    fields = [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("label_index", pa.int32(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("copy", pa.int32(), nullable=False),
    ]
    for name, tap in taps.items():
        size = int(np.prod(tap.shape))
        fields.append(
            pa.field(
                tap_column(name),
                pa.list_(_ARROW_DTYPES[tap.dtype], size),
                nullable=False,
                metadata={"shape": json.dumps(list(tap.shape)), "dtype": tap.dtype},
            )
        )
    metadata = {
        "wf.taps": json.dumps(
            {n: {"shape": list(t.shape), "dtype": t.dtype} for n, t in taps.items()}
        ),
        "wf.classes": json.dumps(list(classes)),
    }
    return pa.schema(fields, metadata=metadata)


def rows_to_batch(schema: pa.Schema, rows: Mapping[str, object]) -> pa.RecordBatch:
    """Build a record batch from columns: plain lists for the row fields, and for each tap an
    array of shape ``(rows, *tap_shape)`` that is cast to the tap's dtype."""
    arrays = []
    for schema_field in schema:
        values = rows[schema_field.name]
        if pa.types.is_fixed_size_list(schema_field.type):
            value_type = schema_field.type.value_type
            flat = np.ascontiguousarray(values, dtype=value_type.to_pandas_dtype()).reshape(-1)
            arrays.append(
                pa.FixedSizeListArray.from_arrays(
                    pa.array(flat, type=value_type), schema_field.type.list_size
                )
            )
        else:
            arrays.append(pa.array(values, type=schema_field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


@dataclass(frozen=True)
class WrittenFile:
    path: str
    rows: int
    sha256: str
    size_bytes: int


def write_shard_atomically(
    layout: StoreLayout, path: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch]
) -> WrittenFile:
    """Stream ``batches`` into the Parquet file ``path``; it appears only when complete.

    Memory stays bounded by one batch. A process killed midway leaves only a hidden temporary
    file that no Parquet reader lists and no manifest records.
    """
    rows = 0

    def write(stream: pa.NativeFile) -> None:
        nonlocal rows
        with pq.ParquetWriter(stream, schema, compression=COMPRESSION) as writer:
            for batch in batches:
                writer.write_batch(batch)
                rows += batch.num_rows

    write_atomically(layout.filesystem, path, write)
    return WrittenFile(
        path=path,
        rows=rows,
        sha256=file_sha256(layout.filesystem, path),
        size_bytes=layout.size(path) or 0,
    )


def tap_to_numpy(column: pa.ChunkedArray | pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    """A fixed-size-list column as an array of shape ``(rows, *shape)``, without copying twice."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column.flatten().to_numpy(zero_copy_only=False).reshape((len(column), *shape))


class FeatureStore:
    """A read view of one (dataset, backbone) store, trusting only what the manifest records."""

    def __init__(self, layout: StoreLayout, manifest: Manifest) -> None:
        self.layout = layout
        self.manifest = manifest

    @classmethod
    def open(cls, store: str, dataset: str, backbone: str) -> FeatureStore:
        layout = StoreLayout.at(store)
        manifest = read_manifest(layout.filesystem, layout.manifest_path(dataset, backbone))
        if manifest is None:
            raise StoreError(f"no feature store for {dataset}/{backbone} under {store}")
        return cls(layout, manifest)

    @property
    def splits(self) -> list[str]:
        return sorted({record.split for record in self.manifest.shards.values()})

    def files(self, split: str) -> list[str]:
        """The part files of ``split`` that the manifest records, in shard order."""
        records = sorted(
            (r for r in self.manifest.shards.values() if r.split == split), key=lambda r: r.shard
        )
        return [self.layout.absolute(record.file) for record in records]

    def read_table(self, split: str, columns: Iterable[str] | None = None) -> pa.Table:
        files = self.files(split)
        if not files:
            raise StoreError(f"split {split!r} has no shards in {self.manifest.dataset}")
        return pq.read_table(
            files, columns=list(columns) if columns else None, filesystem=self.layout.filesystem
        )

    def read_numpy(
        self, split: str, tap: str, copies: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(features, label_indices)`` of ``split``: features shaped ``(rows, *tap_shape)``.

        With ``copies=False`` only copy 0 (the un-augmented image) of each image is returned.
        """
        if tap not in self.manifest.taps:
            raise StoreError(
                f"tap {tap!r} is not stored; stored taps: {sorted(self.manifest.taps)}"
            )
        table = self.read_table(split, ["label_index", "copy", tap_column(tap)])
        if not copies:
            table = table.filter(pc.equal(table["copy"], 0))
        features = tap_to_numpy(table[tap_column(tap)], self.manifest.taps[tap].shape)
        return features, table["label_index"].to_numpy()
