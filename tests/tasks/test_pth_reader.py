"""The .pth reader refuses code, and crafted tensors that reach past their storage, in one line."""

import collections
import io
import os
import pickle
import struct
import sys
import types

import numpy as np
import pytest

from tasks.backbones.efficientnet_lite import LITE_VARIANTS
from tasks.backbones.pth_reader import (
    LEGACY_MAGIC,
    MalformedWeightsError,
    UnsafePickleError,
    read_legacy_state_dict,
)


def _legacy_file(main_pickle: bytes, keys: list, storages: list[bytes], counts=None) -> bytes:
    out = io.BytesIO()
    for header in (LEGACY_MAGIC, 1001, {"little_endian": True}):
        pickle.dump(header, out, protocol=2)
    out.write(main_pickle)
    pickle.dump(keys, out, protocol=2)
    for index, raw in enumerate(storages):
        out.write(struct.pack("<q", counts[index] if counts else len(raw) // 4))
        out.write(raw)
    return out.getvalue()


class _FakeTorch:
    """Stand-ins for torch's globals, so the tests can write legacy files without torch."""

    def __enter__(self):
        self.torch, self.utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

        class FloatStorage:
            pass

        FloatStorage.__module__ = "torch"
        FloatStorage.__qualname__ = "FloatStorage"

        def _rebuild_tensor_v2(*args):  # pragma: no cover - never called here
            raise AssertionError

        _rebuild_tensor_v2.__module__ = "torch._utils"
        _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
        self.torch.FloatStorage, self.utils._rebuild_tensor_v2 = FloatStorage, _rebuild_tensor_v2
        sys.modules.update({"torch": self.torch, "torch._utils": self.utils})
        return self

    def __exit__(self, *exc):
        del sys.modules["torch"], sys.modules["torch._utils"]


class _Tensor:
    def __init__(self, key, numel, offset, size, stride):
        self.args = (key, numel, offset, size, stride)

    def __reduce__(self):
        key, numel, offset, size, stride = self.args
        storage = _StorageRef(key, numel)
        return (sys.modules["torch._utils"]._rebuild_tensor_v2,
                (storage, offset, size, stride, False, collections.OrderedDict()))  # fmt: skip


class _StorageRef:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", sys.modules["torch"].FloatStorage, obj.key, "cpu", obj.numel, None)
        return None


def crafted(tensors: dict, storage_elements: int = 6, declared=None, stored=None) -> bytes:
    """A legacy file with one float storage "0" of ``storage_elements`` and the tensors given as
    ``{name: (offset, size, stride)}``."""
    with _FakeTorch():
        body = io.BytesIO()
        state = collections.OrderedDict(
            (name, _Tensor("0", declared or storage_elements, *args))
            for name, args in tensors.items()
        )
        _Pickler(body, protocol=2).dump(state)
    raw = np.arange(stored if stored is not None else storage_elements, dtype="<f4").tobytes()
    return _legacy_file(body.getvalue(), ["0"], [raw], counts=[declared or storage_elements])


def test_reads_a_well_formed_file():
    state = read_legacy_state_dict(crafted({"w": (0, (2, 3), (3, 1)), "t": (1, (2, 2), (1, 2))}))
    np.testing.assert_array_equal(state["w"], np.arange(6, dtype="<f4").reshape(2, 3))
    np.testing.assert_array_equal(state["t"], [[1, 3], [2, 4]])  # a transposed view


@pytest.mark.parametrize(
    ("tensors", "extra", "message"),
    [
        ({"w": (0, (2, 4), (4, 1))}, {}, "reach past its storage"),  # size too big
        ({"w": (3, (2, 3), (3, 1))}, {}, "reach past its storage"),  # offset too far
        ({"w": (0, (2, 3), (30, 1))}, {}, "reach past its storage"),  # stride too long
        ({"w": (0, (10**6, 10**6), (0, 0))}, {}, "reach past its storage"),  # an expanded bomb
        ({"w": (-1, (2,), (1,))}, {}, "non-negative"),
        ({"w": (0, (2, -3), (3, 1))}, {}, "non-negative"),
        ({"w": (0, (2, 3), (3,))}, {}, "differ in length"),
        ({"w": (0, ("a",), (1,))}, {}, "non-negative"),
        ({"w": (0, (2, 3), (3, 1))}, {"declared": 10**12}, "larger than the file"),
        ({"w": (0, (2, 3), (3, 1))}, {"stored": 3}, "truncated"),
    ],
)
def test_crafted_tensors_are_refused_in_one_line(tensors, extra, message):
    with pytest.raises(MalformedWeightsError, match=message) as caught:
        read_legacy_state_dict(crafted(tensors, **extra))
    assert "\n" not in str(caught.value)


def test_refuses_a_pickle_naming_a_disallowed_global(tmp_path):
    marker = tmp_path / "pwned"
    body = pickle.dumps(os.system, protocol=2)
    evil = (b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(f"touch {marker}"))
            + f"touch {marker}".encode() + b"\x85R.")  # fmt: skip
    for payload in (body, evil):
        with pytest.raises(UnsafePickleError, match="not on the allow-list"):
            read_legacy_state_dict(_legacy_file(payload, [], []))
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [pickle.dumps([1, 2], protocol=2), pickle.dumps({"w": "text"}, protocol=2),
     pickle.dumps({1: 2.0}, protocol=2), b"\x80\x02(((((((((((", b""],
)  # fmt: skip
def test_refuses_state_that_is_not_a_state_dict(payload):
    with pytest.raises(pickle.UnpicklingError):
        read_legacy_state_dict(_legacy_file(payload, [], []))


def test_refuses_a_file_that_is_not_legacy_torch_or_too_large(tmp_path):
    with pytest.raises(pickle.UnpicklingError):
        read_legacy_state_dict(pickle.dumps({"a": 1}))
    big = tmp_path / "big.pth"
    big.write_bytes(b"\0" * 2048)
    with pytest.raises(MalformedWeightsError, match="over the 1024-byte limit"):
        read_legacy_state_dict(str(big), max_bytes=1024)


@pytest.mark.parametrize("name", sorted(LITE_VARIANTS))
def test_reads_the_packaged_lite_weights(name):
    variant = LITE_VARIANTS[name]
    state = read_legacy_state_dict(variant.packaged_weights_path())
    _, _, expand, channels_in, channels_out = variant.blocks[-1]
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert f"_blocks.{variant.last_block + 1}._project_conv.weight" not in state
    assert state[f"_blocks.{variant.last_block}._project_conv.weight"].shape == (
        channels_out, channels_in * expand, 1, 1,
    )  # fmt: skip
    assert state["_fc.weight"].shape == (1000, 1280)
    assert all(np.isfinite(v).all() for v in state.values())
