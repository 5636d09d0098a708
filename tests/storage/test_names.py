import os

import pytest

from storage.names import escape_name, unescape_name


@pytest.mark.parametrize(
    "raw",
    [b"plain.jpg", b"caf\xc3\xa9.jpg", b"caf\xe9.jpg", b"back\\slash.jpg", b"\\xe9 literal.jpg",
     b"new\nline .jpg", b"\xff\xfe\x00x"[:-2] + b"z", "日本.png".encode()],
)  # fmt: skip
def test_every_byte_name_round_trips_through_valid_utf8(raw):
    name = os.fsdecode(raw)
    text = escape_name(name)
    text.encode("utf-8")  # valid UTF-8: JSON and Parquet can hold it
    assert os.fsencode(unescape_name(text)) == raw


def test_ordinary_names_are_unchanged_and_escapes_are_unambiguous():
    assert escape_name("cats/cat.1.jpg") == "cats/cat.1.jpg"
    assert escape_name(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg"
    assert escape_name("caf\\xe9.jpg") == "caf\\\\xe9.jpg"  # a literal backslash is doubled
    assert escape_name(os.fsdecode(b"caf\xe9.jpg")) != escape_name("caf\\xe9.jpg")
