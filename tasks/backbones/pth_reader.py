"""Read a PyTorch legacy-format (pre-1.6, not zip) state dict without torch, safely.

The legacy format is a sequence of pickles: a magic number, the protocol version, system info,
the state dict itself (tensors refer to storages by persistent id), and the list of storage
keys; after them come the storages' raw bytes, each preceded by its element count as a
little-endian int64 (``torch/serialization.py``, ``_legacy_load``).

Unpickling runs whatever callables a pickle names, so :class:`AllowListUnpickler` resolves only
the handful of globals a state dict needs and maps them to numpy stand-ins; any other global is
refused before anything runs. Nothing the file says is trusted: the file's size is capped,
every storage's element count must fit in the file, and every tensor's offset, shape and
strides must stay inside its storage before a single element is read, so a crafted file is one
:class:`pickle.UnpicklingError`, never out-of-bounds memory or a crash.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
MAX_FILE_BYTES = 1 << 31  # 2 GiB: the Lite weights are 19-39 MB
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


class MalformedWeightsError(pickle.UnpicklingError):
    """The file is not a well-formed legacy state dict (sizes, offsets or types out of range)."""


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def check(self, name: str) -> None:
        """The view stays inside its storage and is no larger than it."""
        if self.storage.data is None:
            raise MalformedWeightsError(f"{name}: its storage's bytes are not in the file")
        count = math.prod(self.size)
        if count == 0:
            return
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if last >= self.storage.numel or count > self.storage.numel:
            raise MalformedWeightsError(
                f"{name}: shape {self.size}, strides {self.stride} and offset {self.offset} reach "
                f"past its storage of {self.storage.numel} elements"
            )

    def to_numpy(self) -> np.ndarray:
        data = self.storage.data
        assert data is not None
        if not self.size:
            return data[self.offset].copy()
        itemsize = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], shape=self.size, strides=tuple(s * itemsize for s in self.stride)
        )
        return np.array(view)


def _ints(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    ):
        raise MalformedWeightsError(f"tensor {what} must be non-negative integers: {values!r:.80}")
    return tuple(values)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise MalformedWeightsError(
            f"a tensor must refer to a storage, not {type(storage).__name__}"
        )
    (offset,) = _ints([offset], "offset")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise MalformedWeightsError(f"tensor size {size} and stride {stride} differ in length")
    return _TensorRef(storage, offset, size, stride)


class AllowListUnpickler(pickle.Unpickler):
    """Resolves only OrderedDict, torch's tensor rebuilders and storage types."""

    def __init__(self, file: BinaryIO, storages: dict[str, _Storage], max_elements: int) -> None:
        super().__init__(file)
        self._storages = storages
        self._max_elements = max_elements

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafePickleError(f"refusing to load global {module}.{name}: not on the allow-list")

    def persistent_load(self, saved_id: Any) -> Any:
        if not (isinstance(saved_id, tuple) and len(saved_id) == 6 and saved_id[0] == "storage"):
            raise UnsafePickleError(f"unsupported persistent id {saved_id!r:.80}")
        _, storage_type, key, _location, numel, view_metadata = saved_id
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise UnsafePickleError(f"unsupported storage {storage_type!r:.40} {key!r:.40}")
        if view_metadata is not None:
            raise UnsafePickleError("storage views are not supported")
        (numel,) = _ints([numel], "storage size")
        if numel * storage_type.dtype.itemsize > self._max_elements:
            raise MalformedWeightsError(
                f"storage {key} claims {numel} elements: larger than the file"
            )
        storage = self._storages.setdefault(key, _Storage(storage_type.dtype, numel))
        if storage.numel != numel or storage.dtype != storage_type.dtype:
            raise MalformedWeightsError(f"storage {key} is declared twice, differently")
        return storage


class _HeaderUnpickler(pickle.Unpickler):
    """For the header pickles, which hold only ints, strings, lists and dicts."""

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(f"refusing to load global {module}.{name} in the file header")


def _read_file(path: str, limit: int) -> bytes:
    size = os.path.getsize(path)
    if size > limit:
        raise MalformedWeightsError(f"{size} bytes is over the {limit}-byte limit for weights")
    with open(path, "rb") as handle:
        return handle.read()


def read_legacy_state_dict(
    path_or_bytes: str | bytes, max_bytes: int = MAX_FILE_BYTES
) -> dict[str, np.ndarray]:
    """The tensors of a legacy ``.pth`` state dict as numpy arrays, keyed by parameter name."""
    data = (
        path_or_bytes if isinstance(path_or_bytes, bytes) else _read_file(path_or_bytes, max_bytes)
    )
    if len(data) > max_bytes:
        raise MalformedWeightsError(f"{len(data)} bytes is over the {max_bytes}-byte limit")
    try:
        return _read(io.BytesIO(data), len(data))
    except pickle.UnpicklingError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, EOFError, struct.error,
            RecursionError, MemoryError, OverflowError) as error:  # fmt: skip
        raise MalformedWeightsError(
            f"malformed file: {type(error).__name__}: {error}"[:300]
        ) from None


def _read(stream: io.BytesIO, size: int) -> dict[str, np.ndarray]:
    magic = _HeaderUnpickler(stream).load()
    if magic != LEGACY_MAGIC:
        raise pickle.UnpicklingError("not a PyTorch legacy-format file (bad magic number)")
    protocol = _HeaderUnpickler(stream).load()
    if protocol != 1001:
        raise pickle.UnpicklingError(f"unsupported legacy protocol version {protocol!r:.40}")
    _HeaderUnpickler(stream).load()  # system info: endianness and type sizes
    storages: dict[str, _Storage] = {}
    state = AllowListUnpickler(stream, storages, size).load()
    keys = _HeaderUnpickler(stream).load()
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
        raise MalformedWeightsError("the storage key list does not match the tensors' storages")
    for key in keys:
        storage = storages[key]
        (count,) = struct.unpack("<q", stream.read(8))
        if count != storage.numel:
            raise MalformedWeightsError(
                f"storage {key}: {count} elements, expected {storage.numel}"
            )
        raw = stream.read(count * storage.dtype.itemsize)
        if len(raw) != count * storage.dtype.itemsize:
            raise MalformedWeightsError(f"storage {key} is truncated")
        storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
    if not isinstance(state, dict):
        raise MalformedWeightsError(f"expected a state dict, found {type(state).__name__}")
    out = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise MalformedWeightsError(f"parameter name {name!r:.40} is not a string")
        if isinstance(value, _TensorRef):
            value.check(name)
            out[name] = value.to_numpy()
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = np.asarray(value)
        else:
            raise MalformedWeightsError(f"{name}: a {type(value).__name__} is not a tensor")
    return out
