"""The Open Inference Protocol's binary tensor extension, request and response, byte by byte."""

import json

import numpy as np
import pytest

from tasks.serving import (
    Rejected,
    decode_tensor_input,
    encode_outputs,
    pack_bytes,
    split_binary_request,
    unpack_bytes,
)


def _request(inputs: list[dict], tail: bytes) -> tuple[bytes, str]:
    head = json.dumps({"inputs": inputs}).encode()
    return head + tail, str(len(head))


def test_binary_inputs_are_split_and_decoded_in_order():
    images = [b"\xff\xd8one", b"two!"]
    pixels = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    packed = pack_bytes(images)
    assert unpack_bytes(packed) == images
    body, header = _request(
        [{"name": "images", "datatype": "BYTES", "shape": [2],
          "parameters": {"binary_data_size": len(packed)}},
         {"name": "pixels", "datatype": "UINT8", "shape": [2, 4, 4, 3],
          "parameters": {"binary_data_size": pixels.nbytes}}],
        packed + pixels.tobytes(),
    )  # fmt: skip
    payload, binary = split_binary_request(body, header)
    assert decode_tensor_input(payload["inputs"][0], (4, 4), binary[0]) == images
    found = decode_tensor_input(payload["inputs"][1], (4, 4), binary[1])
    np.testing.assert_array_equal(np.stack(found), pixels)
    # Without the header the body is all JSON and every input's data is in it.
    plain = json.dumps({"inputs": [{"datatype": "UINT8", "data": [1]}]}).encode()
    assert split_binary_request(plain, None)[1] == [None]


@pytest.mark.parametrize(
    ("tail", "header", "size", "message"),
    [
        (b"", "abc", 0, "must be a byte count"),
        (b"", "100000", 0, "is over the body's"),
        (b"xyz", None, 5, "does not fit the body"),
        (b"xyzw", None, 3, "1 bytes after the inputs' binary data"),
    ],
)
def test_a_binary_request_that_does_not_add_up_is_one_line_400(tail, header, size, message):
    body, own = _request(
        [{"name": "images", "datatype": "BYTES", "shape": [1],
          "parameters": {"binary_data_size": size}}], tail)  # fmt: skip
    with pytest.raises(Rejected, match=message) as refused:
        split_binary_request(body, header or own)
    assert refused.value.status == 400
    with pytest.raises(Rejected, match="ends inside an element"):
        unpack_bytes(b"\x05\x00\x00\x00ab")


def test_outputs_come_back_as_asked():
    outputs = [
        {"name": "probabilities", "datatype": "FP64", "shape": [1, 2], "data": [0.25, 0.75]},
        {"name": "abstained", "datatype": "BOOL", "shape": [1], "data": [True]},
        {"name": "reason", "datatype": "BYTES", "shape": [1], "data": ["low_confidence"]},
    ]
    shown, tail = encode_outputs({}, outputs)
    assert shown == outputs and tail == b""
    shown, tail = encode_outputs({"parameters": {"binary_data_output": True}}, outputs)
    sizes = [o["parameters"]["binary_data_size"] for o in shown]
    assert sizes == [16, 1, 4 + len("low_confidence")] and len(tail) == sum(sizes)
    np.testing.assert_array_equal(np.frombuffer(tail[:16], "<f8"), [0.25, 0.75])
    assert unpack_bytes(tail[17:]) == [b"low_confidence"]
    asked = {"outputs": [{"name": "reason", "parameters": {"binary_data": False}}]}
    shown, tail = encode_outputs(asked, outputs)
    assert [o["name"] for o in shown] == ["reason"] and tail == b""
    with pytest.raises(Rejected, match="no output 'logits'"):
        encode_outputs({"outputs": [{"name": "logits"}]}, outputs)
