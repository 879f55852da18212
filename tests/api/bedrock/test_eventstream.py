"""Byte-level tests of the event-stream encoder, checked by botocore's own decoder (spec §5.6)."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator

import botocore.session
import pytest
from botocore.eventstream import ChecksumMismatch, EventStream, EventStreamBuffer
from botocore.exceptions import EventStreamError
from botocore.parsers import EventStreamJSONParser

from promptcache.api.bedrock.eventstream import (
    MAX_PAYLOAD_BYTES,
    encode_headers,
    encode_message,
    event_message,
    exception_message,
)
from tests.api.bedrock.conftest import decode_frames

# event_message("messageStop", {"stopReason": "end_turn"}), field by field.
GOLDEN = bytes.fromhex(
    "0000007a"  # total_length 122 = 12 + 81 + 25 + 4
    "00000051"  # headers_length 81
    "ca2c4665"  # CRC-32 of the 8 bytes above
    "0b3a6576656e742d74797065"
    "07"
    "000b"
    "6d65737361676553746f70"  # :event-type = messageStop
    "0d3a636f6e74656e742d74797065"
    "07"
    "0010"
    "6170706c69636174696f6e2f6a736f6e"
    "0d3a6d6573736167652d74797065"
    "07"
    "0005"
    "6576656e74"  # :message-type = event
    "7b2273746f70526561736f6e223a22656e645f7475726e227d"  # {"stopReason":"end_turn"}
    "5fbf09fc"  # CRC-32 of everything before it
)


def test_golden_event_message() -> None:
    assert event_message("messageStop", {"stopReason": "end_turn"}) == GOLDEN


def test_prelude_and_crcs_are_ieee_crc32() -> None:
    raw = event_message("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "hé"}})
    total, headers_length = struct.unpack("!II", raw[:8])
    assert total == len(raw)
    assert struct.unpack("!I", raw[8:12])[0] == zlib.crc32(raw[:8])
    assert struct.unpack("!I", raw[-4:])[0] == zlib.crc32(raw[:-4])
    payload = raw[12 + headers_length : -4]
    assert json.loads(payload) == {"contentBlockIndex": 0, "delta": {"text": "hé"}}


def test_botocore_decodes_every_field() -> None:
    [message] = decode_frames(GOLDEN)
    assert message.prelude.total_length == 122
    assert message.prelude.headers_length == 81
    assert message.prelude.crc == 0xCA2C4665
    assert message.crc == 0x5FBF09FC
    assert message.headers == {
        ":event-type": "messageStop",
        ":content-type": "application/json",
        ":message-type": "event",
    }
    assert json.loads(message.payload) == {"stopReason": "end_turn"}


def test_exception_message_headers() -> None:
    [message] = decode_frames(exception_message("modelStreamErrorException", "boom"))
    assert message.headers == {
        ":exception-type": "modelStreamErrorException",
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    assert json.loads(message.payload) == {"message": "boom"}
    assert message.to_response_dict()["status_code"] == 400


def test_unicode_and_empty_values() -> None:
    raw = encode_message({"ünï": "cödé", "empty": ""}, b"")
    [message] = decode_frames(raw)
    assert message.headers == {"ünï": "cödé", "empty": ""}
    assert message.payload == b""
    assert len(raw) == 12 + len(encode_headers({"ünï": "cödé", "empty": ""})) + 4


def test_concatenated_messages_decode_in_order() -> None:
    raw = b"".join(event_message("contentBlockStop", {"contentBlockIndex": i}) for i in range(3))
    indices = [json.loads(m.payload)["contentBlockIndex"] for m in decode_frames(raw)]
    assert indices == [0, 1, 2]


@pytest.mark.parametrize("where", [9, 40, -6, -1], ids=["prelude-crc", "headers", "payload", "crc"])
def test_botocore_rejects_any_corrupted_byte(where: int) -> None:
    corrupted = bytearray(GOLDEN)
    corrupted[where] ^= 0x01
    buffer = EventStreamBuffer()
    buffer.add_data(bytes(corrupted))
    with pytest.raises(ChecksumMismatch):
        list(buffer)


def test_limits() -> None:
    with pytest.raises(ValueError, match="too long"):
        encode_headers({"x" * 256: "v"})
    with pytest.raises(ValueError, match="too long"):
        encode_headers({"x": "v" * 65536})
    with pytest.raises(ValueError, match="limit"):
        encode_message({}, b"\0" * (MAX_PAYLOAD_BYTES + 1))
    assert len(encode_message({}, b"\0" * MAX_PAYLOAD_BYTES)) == MAX_PAYLOAD_BYTES + 16


class _Raw:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self) -> Iterator[bytes]:
        # Odd-sized chunks: botocore must reassemble frames across reads.
        for i in range(0, len(self.data), 7):
            yield self.data[i : i + 7]


def _converse_stream(raw: bytes) -> EventStream:
    model = botocore.session.get_session().get_service_model("bedrock-runtime")
    shape = model.operation_model("ConverseStream").output_shape.members["stream"]
    return EventStream(_Raw(raw), shape, EventStreamJSONParser(), "ConverseStream")


def test_boto3_parses_converse_stream_events() -> None:
    raw = b"".join(
        [
            event_message("messageStart", {"role": "assistant"}),
            event_message("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hi"}}),
            event_message("contentBlockStop", {"contentBlockIndex": 0}),
            GOLDEN,
            event_message(
                "metadata",
                {
                    "usage": {
                        "inputTokens": 3,
                        "outputTokens": 1,
                        "totalTokens": 14,
                        "cacheReadInputTokens": 10,
                        "cacheWriteInputTokens": 0,
                        "cacheDetails": [],
                    },
                    "metrics": {"latencyMs": 5},
                },
            ),
        ]
    )
    events = list(_converse_stream(raw))
    assert [next(iter(e)) for e in events] == [
        "messageStart",
        "contentBlockDelta",
        "contentBlockStop",
        "messageStop",
        "metadata",
    ]
    assert events[1]["contentBlockDelta"]["delta"] == {"text": "Hi"}
    assert events[-1]["metadata"]["usage"]["cacheReadInputTokens"] == 10


def test_boto3_raises_an_exception_message() -> None:
    raw = event_message("messageStart", {"role": "assistant"}) + exception_message(
        "modelStreamErrorException", "the model failed"
    )
    stream = iter(_converse_stream(raw))
    assert next(stream) == {"messageStart": {"role": "assistant"}}
    with pytest.raises(EventStreamError) as info:
        next(stream)
    assert info.value.response["Error"] == {
        "Code": "modelStreamErrorException",
        "Message": "the model failed",
    }
