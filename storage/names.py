"""File names as text that every format can hold.

A Linux file name is any byte string without ``/`` and NUL; Python reads the bytes that are
not UTF-8 as lone surrogates (``surrogateescape``), which JSON, Parquet and UTF-8 cannot store.
:func:`escape_name` writes each such byte as ``\\xHH`` and a backslash as ``\\\\``, so every
name becomes valid UTF-8 and :func:`unescape_name` gives the exact bytes back. Names that are
valid UTF-8 and hold no backslash, nearly all of them, are unchanged.
"""

from __future__ import annotations

import re

_ESCAPED = re.compile(r"\\(\\|x[0-9a-f]{2})")


def escape_name(name: str) -> str:
    """``name`` (possibly holding surrogate-escaped bytes) as valid, reversible UTF-8 text."""
    out = []
    for char in name:
        if char == "\\":
            out.append("\\\\")
        elif "\udc80" <= char <= "\udcff":
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif "\ud800" <= char <= "\udfff":  # a surrogate that is not an escaped byte
            out.append("".join(f"\\x{b:02x}" for b in char.encode("utf-8", "surrogatepass")))
        else:
            out.append(char)
    return "".join(out)


def unescape_name(text: str) -> str:
    """The inverse of :func:`escape_name`: the OS name (surrogate-escaped where not UTF-8)."""
    if "\\" not in text:
        return text
    raw = bytearray()
    position = 0
    for match in _ESCAPED.finditer(text):
        raw += text[position : match.start()].encode()
        token = match.group(1)
        raw += b"\\" if token == "\\" else bytes([int(token[1:], 16)])
        position = match.end()
    raw += text[position:].encode()
    return bytes(raw).decode("utf-8", "surrogateescape")  # as storage.filesystem.os_name
