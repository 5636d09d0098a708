import dataclasses

import pytest

from storage.hashing import (
    content_id,
    fingerprint,
    fingerprint_fields,
    fingerprint_with_rows,
    stable_bucket,
    stable_unit_interval,
)


def test_content_id_is_blake2b_128_of_the_bytes():
    assert content_id(b"abc") == "cf4ab791c62b8d2b2109c90275287816"
    assert content_id(b"abc") != content_id(b"abd")
    assert len(content_id(b"")) == 32


def test_stable_bucket_has_fixed_values():
    # Fixed expectations, computed once: a change to the hash, its salt or its encoding would
    # silently move images between shards and splits of every existing store.
    assert stable_bucket("cats/cat.1.jpg", 8) == 0
    assert stable_unit_interval("x") == pytest.approx(0.9382679234890469, abs=1e-15)
    # A name that is not UTF-8 (surrogate-escaped byte 0xe9) hashes as its bytes, no error.
    assert stable_bucket("caf\udce9.jpg", 8) == 6


def test_stable_bucket_spreads_evenly():
    counts = [0] * 8
    for i in range(4000):
        counts[stable_bucket(f"class/{i}.jpg", 8)] += 1
    assert min(counts) > 400 and max(counts) < 600


def test_fingerprint_is_canonical():
    assert (
        fingerprint({"a": 1}) == "015abd7f5cc57a2dd94b7590f04ad8084273905ee33ec5cebeae62276a97f862"
    )
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


@dataclasses.dataclass(frozen=True)
class _Settings:
    size: int = 1
    speed: int = 2


def test_fingerprint_fields_takes_every_field_but_those_excluded():
    base = fingerprint_fields(_Settings(), exclude=["speed"])
    assert fingerprint_fields(_Settings(speed=9), exclude=["speed"]) == base
    assert fingerprint_fields(_Settings(size=9), exclude=["speed"]) != base
    with pytest.raises(ValueError, match="unknown fields"):
        fingerprint_fields(_Settings(), exclude=["sped"])


@pytest.mark.parametrize(
    ("head", "rows"),
    [
        (
            ["f" * 64, ["cats", "dogs"], None],
            [["cats/1.jpg", 10, 123, "cats"], ["dogs/\udcff.jpg", 0, 1, "dogs"]],
        ),
        (["f", [], 1_000_000], []),
        ([], [{"b": 1, "a": [1.5, None]}]),
    ],
)
def test_fingerprint_with_rows_is_the_fingerprint_of_the_whole_list(head, rows):
    # A shard's input fingerprint is streamed: it must equal the value stores recorded before.
    assert fingerprint_with_rows(head, iter(rows)) == fingerprint([*head, rows])
