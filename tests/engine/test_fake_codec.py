"""``FakeCodec``'s bytes: they round-trip, a saved file holds exactly them, and truncated,
damaged or foreign bytes raise ``CorruptPayload``."""

from __future__ import annotations

from pathlib import Path

import pytest

from promptcache.core.payload import CorruptPayload, new_part_id
from promptcache.engine.fake import FakeCodec, FakePayload


def payload(num_tokens: int, seed: int = 0, page_tokens: int = 64) -> FakePayload:
    tokens = tuple((seed * 31 + i) % 251 for i in range(num_tokens))
    states = tuple(bytes([(seed + i) % 256]) * 32 for i in range(num_tokens + 1))
    pages = tuple(new_part_id() for _ in range(num_tokens // page_tokens))
    return FakePayload(tokens, states, 64, pages, page_tokens, new_part_id())


def test_bytes_round_trip_and_are_the_file(tmp_path: Path) -> None:
    codec = FakeCodec()
    original = payload(150, seed=3)
    data = codec.encode(original, {"entry": "e1"})
    assert len(data) > original.nbytes  # the body is padded to the size a real KV would take
    decoded, metadata = codec.decode(data)
    assert decoded == original
    assert metadata == {"entry": "e1"}
    path = tmp_path / f"x{codec.suffix}"
    codec.save(original, path, {"entry": "e1"})
    assert path.read_bytes() == data
    assert codec.read_metadata(path) == metadata
    assert codec.load(path) == original


@pytest.mark.parametrize(
    "damage", ["flip body", "flip header", "truncate", "pad", "empty", "magic", "foreign"]
)
def test_damaged_bytes_raise_corrupt_payload(damage: str) -> None:
    codec = FakeCodec()
    data = bytearray(codec.encode(payload(150, seed=4), {"entry": "e1"}))
    if damage == "flip body":
        data[-1] ^= 0x01
    elif damage == "flip header":
        data[20] ^= 0x40
    elif damage == "truncate":
        data = data[:-10]
    elif damage == "pad":
        data += b"\0"
    elif damage == "empty":
        data = bytearray()
    elif damage == "magic":  # another version of the format
        data[:9] = b"PCFAKEKV2"
    else:  # bytes of another codec
        data = bytearray(b"\x10\0\0\0\0\0\0\0" + b'{"kv": {}}      ' + bytes(100))
    with pytest.raises(CorruptPayload):
        codec.decode(bytes(data))


def test_damaged_files_raise_corrupt_payload(tmp_path: Path) -> None:
    codec = FakeCodec()
    path = tmp_path / f"x{codec.suffix}"
    codec.save(payload(150, seed=5), path, {})
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CorruptPayload):
        codec.read_metadata(path)
    with pytest.raises(CorruptPayload):
        codec.load(path)
    path.unlink()
    with pytest.raises(CorruptPayload):
        codec.load(path)


def test_encode_refuses_other_payloads() -> None:
    with pytest.raises(TypeError):
        FakeCodec().encode(object(), {})  # type: ignore[arg-type]
    assert isinstance(FakeCodec().decode(FakeCodec().encode(payload(1), {}))[0], FakePayload)
