"""Read a PyTorch legacy-format (pre-1.6, not zip) state dict without torch, safely.

The legacy format is a sequence of pickles: a magic number, the protocol version, system info,
the state dict itself (tensors refer to storages by persistent id), and the list of storage
keys; after them come the storages' raw bytes, each preceded by its element count as a
little-endian int64 (``torch/serialization.py``, ``_legacy_load``).

Unpickling runs whatever callables a pickle names, so :class:`AllowListUnpickler` resolves only
the handful of globals a state dict needs and maps them to numpy stand-ins; any other global is
refused before anything runs.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafePickleError(pickle.UnpicklingError):
    """The file names a global outside the allow-list; nothing it names was run."""


@dataclass
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_STORAGE_DTYPES[self.name])


@dataclass
class _Storage:
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclass
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def to_numpy(self) -> np.ndarray:
        assert self.storage.data is not None, "storage bytes were not read"
        if not self.size:
            return self.storage.data[self.offset].copy()
        itemsize = self.storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            self.storage.data[self.offset :],
            shape=self.size,
            strides=tuple(s * itemsize for s in self.stride),
        )
        return np.array(view)


def _rebuild_tensor(storage: _Storage, offset: int, size: Any, stride: Any, *_: Any) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(size), tuple(stride))


class AllowListUnpickler(pickle.Unpickler):
    """Resolves only OrderedDict, torch's tensor rebuilders and storage types."""

    def __init__(self, file: BinaryIO, storages: dict[str, _Storage]) -> None:
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafePickleError(f"refusing to load global {module}.{name}: not on the allow-list")

    def persistent_load(self, saved_id: Any) -> Any:
        if not (isinstance(saved_id, tuple) and saved_id and saved_id[0] == "storage"):
            raise UnsafePickleError(f"unsupported persistent id {saved_id!r:.80}")
        _, storage_type, key, _location, numel, view_metadata = saved_id
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"unsupported storage type {storage_type!r:.80}")
        if view_metadata is not None:
            raise UnsafePickleError("storage views are not supported")
        storage = self._storages.setdefault(key, _Storage(storage_type.dtype, int(numel)))
        return storage


class _HeaderUnpickler(pickle.Unpickler):
    """For the header pickles, which hold only ints, strings and dicts."""

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(f"refusing to load global {module}.{name} in the file header")


def read_legacy_state_dict(path_or_bytes: str | bytes) -> dict[str, np.ndarray]:
    """The tensors of a legacy ``.pth`` state dict as numpy arrays, keyed by parameter name."""
    if isinstance(path_or_bytes, bytes):
        data = path_or_bytes
    else:
        with open(path_or_bytes, "rb") as handle:
            data = handle.read()
    stream = io.BytesIO(data)
    magic = _HeaderUnpickler(stream).load()
    if magic != LEGACY_MAGIC:
        raise pickle.UnpicklingError("not a PyTorch legacy-format file (bad magic number)")
    protocol = _HeaderUnpickler(stream).load()
    if protocol != 1001:
        raise pickle.UnpicklingError(f"unsupported legacy protocol version {protocol}")
    _HeaderUnpickler(stream).load()  # system info: endianness and type sizes
    storages: dict[str, _Storage] = {}
    state = AllowListUnpickler(stream, storages).load()
    keys = _HeaderUnpickler(stream).load()
    for key in keys:
        storage = storages[key]
        (count,) = struct.unpack("<q", stream.read(8))
        if count != storage.numel:
            raise pickle.UnpicklingError(
                f"storage {key}: {count} elements, expected {storage.numel}"
            )
        raw = stream.read(count * storage.dtype.itemsize)
        if len(raw) != count * storage.dtype.itemsize:
            raise pickle.UnpicklingError(f"storage {key} is truncated")
        storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
    if not isinstance(state, dict):
        raise pickle.UnpicklingError(f"expected a state dict, found {type(state).__name__}")
    return {
        name: value.to_numpy() if isinstance(value, _TensorRef) else np.asarray(value)
        for name, value in state.items()
    }
