"""Parquet feature stores: the schema of a row, the part writer, and the reader.

A row is one copy of one image: its content id, relative path, label, label index, split, copy
index (0 is the un-augmented image) and one fixed-size-list column per tap. Shapes and dtypes
are in the schema metadata, so any Parquet reader (pandas, polars, DuckDB,
``ray.data.read_parquet``) can open a part file and reshape the features; only the files the
manifest names count.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from storage.errors import StoreError
from storage.filesystem import file_sha256, first_line, list_files, retrying, write_stream
from storage.layout import StoreLayout
from storage.manifest import Manifest, TapRecord, read_manifest

FEATURE_DTYPES = ("float16", "float32")
_ARROW_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
COMPRESSION = "zstd"


def _encodings(schema: pa.Schema) -> dict[str, list[str]]:
    """ParquetWriter options: dictionaries for the row fields only, and the float columns (the
    taps) split by byte before zstd. A dictionary of float features never pays: Parquet builds
    one, finds it too large and falls back, which was half of a part's writing time; split
    bytes compress better (measured on a cats_vs_dogs part of Lite0's two taps: 0.105 s and
    5.56 MB written with the defaults, 0.047 s and 4.75 MB so)."""
    lists = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    floats = {
        f.name
        for f in schema
        if pa.types.is_floating(f.type)
        or (any(is_list(f.type) for is_list in lists) and pa.types.is_floating(f.type.value_type))
    }
    return {
        "use_dictionary": [f.name for f in schema if f.name not in floats],
        "use_byte_stream_split": [
            name if pa.types.is_floating(schema.field(name).type) else f"{name}.list.element"
            for name in sorted(floats)
        ],
    }


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
        fields.append(
            pa.field(
                tap_column(name),
                pa.list_(_ARROW_DTYPES[tap.dtype], int(np.prod(tap.shape))),
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


class _Hashing:
    """A writable file object that hashes and counts what passes through to ``stream``."""

    def __init__(self, stream: pa.NativeFile) -> None:
        self.stream, self.digest, self.size, self.closed = stream, hashlib.sha256(), 0, False

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += len(view)
        self.stream.write(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def write_part(
    layout: StoreLayout, path: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch]
) -> WrittenFile:
    """Stream ``batches`` into the Parquet file ``path``, hashing as it goes; memory stays
    bounded by one batch. Readers see the file whole or not at all, and trust it only once a
    commit names it."""
    state: dict[str, object] = {}

    def write(stream: pa.NativeFile) -> None:
        sink = _Hashing(stream)
        rows = 0
        options = _encodings(schema)
        with pq.ParquetWriter(sink, schema, compression=COMPRESSION, **options) as writer:
            for batch in batches:
                writer.write_batch(batch)
                rows += batch.num_rows
        state.update(rows=rows, sha256=sink.digest.hexdigest(), size=sink.size)

    write_stream(layout.filesystem, path, write)
    return WrittenFile(path, int(state["rows"]), str(state["sha256"]), int(state["size"]))  # type: ignore[arg-type]


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
    def open(cls, store: str | StoreLayout, dataset: str, backbone: str) -> FeatureStore:
        layout = store if isinstance(store, StoreLayout) else StoreLayout.at(store)
        manifest = read_manifest(layout, dataset, backbone)
        if manifest is None:
            raise StoreError(
                f"no feature store for {dataset}/{backbone} under {layout.location.uri}"
            )
        return cls(layout, manifest)

    @property
    def name(self) -> str:
        return f"{self.manifest.dataset}/{self.manifest.backbone}"

    def files(self, split: str) -> list[str]:
        """The part files of ``split`` that the manifest records, in shard order."""
        return [self.layout.absolute(file) for file in self.manifest.files(split)]

    def part_problems(self, sha256: bool = False) -> list[str]:
        """Every way the parts differ from what the manifest records: shards not committed, a
        part missing, its size (one listing) or row count (its footer) wrong and, with
        ``sha256``, its content (every byte read). One line each; empty when all agree."""
        manifest, shown, fs = self.manifest, self.layout.location.display, self.layout.filesystem
        problems = []
        missing = sorted(manifest.expected_keys() - set(manifest.shards))
        if missing:
            problems.append(
                f"store {self.name} is incomplete: shards {', '.join(missing[:4])}"
                f"{' ...' if len(missing) > 4 else ''} are not committed; run `wf extract` again"
            )
        folder = self.layout.backbone_dir(manifest.dataset, manifest.backbone)
        sizes = {i.path: i.size for i in list_files(fs, folder)}
        for record in sorted(manifest.shards.values(), key=lambda r: r.key):
            path = self.layout.absolute(record.file)
            if path not in sizes:
                problems.append(f"part {shown(path)} named by the manifest is missing")
            elif sizes[path] != record.size_bytes:
                problems.append(f"part {shown(path)} has {sizes[path]} bytes, the manifest "
                                f"says {record.size_bytes}")  # fmt: skip
            elif isinstance(rows := _footer_rows(fs, path), str):
                problems.append(f"part {shown(path)}: its Parquet footer cannot be read ({rows})")
            elif rows != record.rows:
                problems.append(
                    f"part {shown(path)} has {rows} rows, the manifest says {record.rows}"
                )
            elif sha256 and file_sha256(fs, path) != record.sha256:
                problems.append(f"part {shown(path)}: SHA-256 differs from the manifest's")
        return problems

    def verify_parts(self) -> None:
        """:meth:`part_problems` without reading every byte (cheap: a listing and each file's
        footer), the first one raised as a :class:`StoreError`."""
        problems = self.part_problems()
        if problems:
            raise StoreError(problems[0])

    def empty_classes(self) -> list[str]:
        """Classes with no usable training image."""
        counts = self.manifest.images_per_class("train")
        return [
            name for name, count in zip(self.manifest.classes, counts, strict=True) if not count
        ]

    def read_table(
        self, split: str, columns: Iterable[str] | None = None, first_copy_only: bool = False
    ) -> pa.Table:
        """The rows of ``split`` (only copy 0 of each image with ``first_copy_only``)."""
        files = self.files(split)
        if not files:
            raise StoreError(f"split {split!r} has no shards in {self.name}")
        return read_parts(self.layout.filesystem, files, columns, first_copy_only)

    def has_split(self, split: str) -> bool:
        return bool(self.manifest.files(split)) and any(
            r.rows for r in self.manifest.shards.values() if r.split == split
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
        table = self.read_table(split, ["label_index", tap_column(tap)], first_copy_only=not copies)
        features = tap_to_numpy(table[tap_column(tap)], self.manifest.taps[tap].shape)
        return features, table["label_index"].to_numpy()


def read_parts(
    filesystem: pafs.FileSystem, files: Iterable[str], columns: Iterable[str] | None = None,
    first_copy_only: bool = False,
) -> pa.Table:  # fmt: skip
    """The one reader of a store's part files: ``columns`` of ``files`` in order (every column
    when None), only copy 0 of each image (the un-augmented one) with ``first_copy_only``."""
    names = list(columns) if columns else None
    filters = [("copy", "=", 0)] if first_copy_only else None
    return retrying(
        filesystem,
        lambda: pq.read_table(list(files), columns=names, filesystem=filesystem, filters=filters),
    )


def _footer_rows(filesystem: pafs.FileSystem, path: str) -> int | str:
    """A part's row count, from its footer, or why the footer cannot be read (a damaged file:
    a problem to report, not an error)."""
    try:
        return retrying(
            filesystem, lambda: pq.ParquetFile(path, filesystem=filesystem).metadata.num_rows
        )
    except (OSError, pa.ArrowException) as error:
        return first_line(error)
