"""Content ids, stable buckets and fingerprints: the one place these hashes are computed."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Iterable
from typing import Any

CONTENT_ID_BYTES = 16


def content_id(data: bytes) -> str:
    """A stable image id: the BLAKE2b-128 hex digest of the file's bytes."""
    return hashlib.blake2b(data, digest_size=CONTENT_ID_BYTES).hexdigest()


def stable_unit_interval(key: str, salt: str = "") -> float:
    """Map ``key`` to [0, 1) by a hash that is the same on every machine and Python run.

    ``key`` may hold surrogate-escaped bytes (a file name that is not UTF-8): they are hashed
    as the original bytes.
    """
    data = f"{salt}\0{key}".encode("utf-8", "surrogateescape")
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def stable_bucket(key: str, buckets: int, salt: str = "") -> int:
    """The bucket of ``key`` among ``buckets``; adding other keys never moves it."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    return int(stable_unit_interval(key, salt) * buckets)


def canonical_json(value: Any) -> str:
    """The JSON that fingerprints hash: sorted keys, no whitespace, tuples as lists."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_jsonable)


def fingerprint(value: Any) -> str:
    """SHA-256 of the canonical JSON of ``value`` (sorted keys, no whitespace)."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def fingerprint_with_rows(head: list, rows: Iterable[Any], chunk: int = 4096) -> str:
    """``fingerprint([*head, list(rows)])``, the rows hashed ``chunk`` at a time: the same
    value without a Python list of every row (a shard of a large dataset has millions)."""
    digest = hashlib.sha256()
    digest.update(f"{canonical_json(head)[:-1]}{',' if head else ''}[".encode())  # "[a,b,["
    update_with_rows(digest, rows, chunk)
    digest.update(b"]]")
    return digest.hexdigest()


def update_with_rows(digest: Any, rows: Iterable[Any], chunk: int = 4096) -> None:
    """Feed ``digest`` the canonical JSON of ``rows`` as the items of a list, without its
    brackets (``a,b,c``), ``chunk`` rows at a time: one ``json.dumps`` a chunk, not one a row."""
    rows, first = iter(rows), True
    while batch := list(itertools.islice(rows, chunk)):
        digest.update(f"{'' if first else ','}{canonical_json(batch)[1:-1]}".encode())
        first = False


def fingerprint_fields(settings: Any, exclude: Iterable[str]) -> str:
    """The fingerprint of every field of the dataclass ``settings`` except those in ``exclude``.

    As in Hugging Face datasets' ``fingerprint.py``: a field added later is part of the
    fingerprint unless someone names it here, so nothing that changes a result is left out by
    default. Nested dataclasses are hashed field by field.
    """
    excluded = set(exclude)
    unknown = excluded - {f.name for f in dataclasses.fields(settings)}
    if unknown:
        raise ValueError(f"cannot exclude unknown fields {sorted(unknown)}")
    return fingerprint(
        {
            f.name: getattr(settings, f.name)
            for f in dataclasses.fields(settings)
            if f.name not in excluded
        }
    )


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot fingerprint {type(value).__name__}")


def sha256_stream(chunks: Iterable[bytes]) -> str:
    """SHA-256 hex digest of an iterable of byte chunks."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()
