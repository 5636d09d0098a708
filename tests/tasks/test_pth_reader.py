import io
import os
import pickle
import struct

import numpy as np
import pytest

from tasks.backbones.efficientnet_lite import LITE_VARIANTS
from tasks.backbones.pth_reader import LEGACY_MAGIC, UnsafePickleError, read_legacy_state_dict


def _legacy_file(main_pickle: bytes, keys: list[str], storages: list[bytes]) -> bytes:
    out = io.BytesIO()
    for header in (LEGACY_MAGIC, 1001, {"little_endian": True}):
        pickle.dump(header, out, protocol=2)
    out.write(main_pickle)
    pickle.dump(keys, out, protocol=2)
    for raw in storages:
        out.write(struct.pack("<q", len(raw) // 4))
        out.write(raw)
    return out.getvalue()


def test_reads_a_handmade_legacy_file():
    # A protocol-2 pickle of OrderedDict(w=_rebuild_tensor_v2(storage "0", 0, (2, 3), (3, 1), ...))
    body = (
        b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01X\x01\x00\x00\x00wq\x02"
        b"ctorch._utils\n_rebuild_tensor_v2\nq\x03((X\x07\x00\x00\x00storageq\x04"
        b"ctorch\nFloatStorage\nq\x05X\x01\x00\x00\x000q\x06X\x03\x00\x00\x00cpuq\x07K\x06Ntq\x08QK\x00"
        b"K\x02K\x03\x86q\tK\x03K\x01\x86q\n\x89ccollections\nOrderedDict\nq\x0b)Rq\x0ctq\rRq\x0es."
    )
    values = np.arange(6, dtype="<f4")
    state = read_legacy_state_dict(_legacy_file(body, ["0"], [values.tobytes()]))
    np.testing.assert_array_equal(state["w"], values.reshape(2, 3))


def test_refuses_a_pickle_naming_a_disallowed_global(tmp_path):
    marker = tmp_path / "pwned"
    body = pickle.dumps(os.system, protocol=2)  # a global outside the allow-list
    evil = (
        b"\x80\x02cos\nsystem\nX"
        + struct.pack("<I", len(f"touch {marker}"))
        + f"touch {marker}".encode()
        + b"\x85R."
    )
    for payload in (body, evil):
        with pytest.raises(UnsafePickleError, match="not on the allow-list"):
            read_legacy_state_dict(_legacy_file(payload, [], []))
    assert not marker.exists()


def test_refuses_a_file_that_is_not_legacy_torch():
    with pytest.raises(pickle.UnpicklingError):
        read_legacy_state_dict(pickle.dumps({"a": 1}))


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
