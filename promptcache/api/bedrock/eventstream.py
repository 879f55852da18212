"""AWS event-stream binary frames, as botocore's ``eventstream.py`` decodes them (spec §5.6).

One message::

    offset      size  field
    0           4     total_length    u32 BE = 12 + H + P + 4
    4           4     headers_length  u32 BE = H
    8           4     prelude_crc     CRC-32 of bytes [0, 8)
    12          H     headers         per header: name_len u8 | name | type u8 | value
    12+H        P     payload
    12+H+P      4     message_crc     CRC-32 of bytes [0, 12+H+P)

CRC-32 is the IEEE polynomial of ``zlib.crc32``. Only string headers (type 7: ``u16`` length, then
UTF-8) are emitted. ConverseStream and InvokeModelWithResponseStream send *event* messages
(``:message-type: event``) and end with an *exception* message when a failure happens after the
response has started; botocore raises the latter as ``EventStreamError``.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from typing import Any, Final

MAX_HEADERS_BYTES: Final = 128 * 1024
MAX_PAYLOAD_BYTES: Final = 24 * 1024 * 1024
PRELUDE_BYTES: Final = 12
CRC_BYTES: Final = 4

_STRING: Final = 7
_PRELUDE: Final = struct.Struct("!II")
_CRC: Final = struct.Struct("!I")


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """The header block: each name and value as a type-7 (string) header, in order."""
    out = bytearray()
    for name, value in headers.items():
        raw_name, raw_value = name.encode(), value.encode()
        if len(raw_name) > 0xFF or len(raw_value) > 0xFFFF:
            raise ValueError(f"event-stream header {name!r} is too long")
        out += bytes([len(raw_name)]) + raw_name
        out += bytes([_STRING]) + len(raw_value).to_bytes(2, "big") + raw_value
    return bytes(out)


def encode_message(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One complete message: prelude, prelude CRC, headers, payload, message CRC."""
    raw_headers = encode_headers(headers)
    if len(raw_headers) > MAX_HEADERS_BYTES or len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError("event-stream message exceeds the header or payload limit")
    total = PRELUDE_BYTES + len(raw_headers) + len(payload) + CRC_BYTES
    prelude = _PRELUDE.pack(total, len(raw_headers))
    head = prelude + _CRC.pack(zlib.crc32(prelude))
    body = head + raw_headers + payload
    return body + _CRC.pack(zlib.crc32(body))


def _json(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def event_message(event_type: str, payload: Mapping[str, Any]) -> bytes:
    """An event message: ``event_type`` is the union member name, e.g. ``contentBlockDelta``."""
    headers = {
        ":event-type": event_type,
        ":content-type": "application/json",
        ":message-type": "event",
    }
    return encode_message(headers, _json(payload))


def exception_message(exception_type: str, message: str) -> bytes:
    """An exception message, e.g. ``modelStreamErrorException``, with payload ``{"message"}``."""
    headers = {
        ":exception-type": exception_type,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return encode_message(headers, _json({"message": message}))


__all__ = [
    "MAX_HEADERS_BYTES",
    "MAX_PAYLOAD_BYTES",
    "encode_headers",
    "encode_message",
    "event_message",
    "exception_message",
]
