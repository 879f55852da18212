"""SigV4 verification against signatures botocore's ``SigV4Auth`` produces."""

from __future__ import annotations

import calendar
import hmac
import time
from dataclasses import replace
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from promptcache.api.bedrock import sigv4
from promptcache.api.bedrock.errors import InvalidSignature
from tests.api.bedrock.conftest import ACCESS_KEY, REGION, SECRET_KEY

HOST = "127.0.0.1:8000"
PATH = "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123%3Ainference-profile%2Fus.m%3A0/converse"
BODY = b'{"messages": [{"role": "user", "content": [{"text": "Hi"}]}]}'


def sign(
    *,
    path: str = PATH,
    query: str = "",
    body: bytes = BODY,
    headers: dict[str, str] | None = None,
    service: str = "bedrock",
    token: str | None = None,
) -> dict[str, Any]:
    """Sign a request with botocore; return what a server receives."""
    url = f"http://{HOST}{path}" + (f"?{query}" if query else "")
    request = AWSRequest(
        method="POST",
        url=url,
        data=body,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY, token), service, REGION).add_auth(request)
    received = [("host", HOST)] + [
        (k.lower(), v.decode() if isinstance(v, bytes) else v) for k, v in request.headers.items()
    ]
    amz_date = dict(received)["x-amz-date"]
    return {
        "auth": sigv4.parse_authorization(dict(received)["authorization"]),
        "raw_path": path,
        "raw_query": query,
        "headers": received,
        "body": body,
        "now": float(calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))),
    }


def verify(signed: dict[str, Any], *, secret: str = SECRET_KEY, method: str = "POST") -> None:
    sigv4.verify(
        signed["auth"],
        secret=secret,
        method=method,
        raw_path=signed["raw_path"],
        raw_query=signed["raw_query"],
        headers=signed["headers"],
        body=signed["body"],
        now=signed["now"],
    )


def test_botocore_signature_verifies() -> None:
    signed = sign()
    auth = signed["auth"]
    assert auth.access_key_id == ACCESS_KEY
    assert (auth.region, auth.service) == (REGION, "bedrock")
    assert auth.signed_headers == ("content-type", "host", "x-amz-date")
    verify(signed)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"query": "b=2&a=1&a=0"},
        {"path": "/model/m/./x/../converse"},
        {"body": b""},
        {"headers": {"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"}},
        {"headers": {"X-Custom": "  spaced   out  value "}},
        {"token": "session-token"},
    ],
    ids=["query", "dot-segments", "empty-body", "unsigned-payload", "trimmed-header", "token"],
)
def test_variants_verify(kwargs: dict[str, Any]) -> None:
    verify(sign(**kwargs))


def test_wrong_secret_fails() -> None:
    with pytest.raises(InvalidSignature, match="does not match"):
        verify(sign(), secret="not-the-secret")


@pytest.mark.parametrize("signature", ["é" * 64, "\ud800", ""])
def test_non_ascii_signature_fails_cleanly(signature: str) -> None:
    """The constant-time compare takes any header text (``compare_digest`` refuses non-ASCII
    ``str``: a TypeError here would be a 500)."""
    signed = sign()
    signed["auth"] = replace(signed["auth"], signature=signature)
    with pytest.raises(InvalidSignature, match="does not match"):
        verify(signed)


def test_signatures_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    signed = sign()
    verify(signed)
    assert compared == [(signed["auth"].signature.encode(),) * 2]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("body", BODY.replace(b"Hi", b"Ho")),
        ("raw_path", PATH.replace("converse", "converse-stream")),
        ("raw_query", "extra=1"),
    ],
)
def test_altered_request_fails(field: str, value: Any) -> None:
    signed = sign()
    signed[field] = value
    with pytest.raises(InvalidSignature, match="does not match"):
        verify(signed)


def test_altered_signed_header_and_method_fail() -> None:
    signed = sign()
    signed["headers"] = [
        (k, "text/plain" if k == "content-type" else v) for k, v in signed["headers"]
    ]
    with pytest.raises(InvalidSignature):
        verify(signed)
    with pytest.raises(InvalidSignature):
        verify(sign(), method="PUT")


def test_content_sha256_must_match_the_body() -> None:
    signed = sign(headers={"X-Amz-Content-SHA256": "0" * 64})
    with pytest.raises(InvalidSignature, match="x-amz-content-sha256"):
        verify(signed)


def test_stale_and_future_dates_fail() -> None:
    signed = sign()
    verify({**signed, "now": signed["now"] + sigv4.MAX_CLOCK_SKEW_S})
    for skew in (sigv4.MAX_CLOCK_SKEW_S + 1, -sigv4.MAX_CLOCK_SKEW_S - 1):
        with pytest.raises(InvalidSignature, match="15 min"):
            verify({**signed, "now": signed["now"] + skew})


def test_scope_date_and_service_are_checked() -> None:
    with pytest.raises(InvalidSignature, match="scoped to correct service"):
        verify(sign(service="s3"))
    signed = sign()
    signed["headers"] = [
        (k, "20200101T000000Z" if k == "x-amz-date" else v) for k, v in signed["headers"]
    ]
    with pytest.raises(InvalidSignature, match="Credential scope"):
        verify({**signed, "now": float(calendar.timegm((2020, 1, 1, 0, 0, 0, 0, 0, 0)))})
    signed["headers"] = [(k, v) for k, v in signed["headers"] if k != "x-amz-date"]
    with pytest.raises(InvalidSignature, match="X-Amz-Date"):
        verify(signed)


def test_parse_authorization() -> None:
    assert sigv4.parse_authorization("Bearer abc") is None
    assert sigv4.parse_authorization("") is None
    for bad in (
        "AWS4-HMAC-SHA256 Credential=AK/20240101/us-east-1/bedrock, SignedHeaders=h, Signature=x",
        "AWS4-HMAC-SHA256 Credential=AK/20240101/us-east-1/bedrock/aws4_request, Signature=x",
    ):
        with pytest.raises(InvalidSignature):
            sigv4.parse_authorization(bad)


def test_canonical_parts() -> None:
    # Non-S3 services double-encode the path as sent.
    assert sigv4.canonical_uri("/model/a%3Ab/converse") == "/model/a%253Ab/converse"
    assert sigv4.canonical_uri("") == "/"
    assert sigv4.canonical_uri("//a/./b/../c/") == "/a/c/"
    assert sigv4.canonical_query("b=2&a=1&c") == "a=1&b=2&c="
    headers = [("Host", "h"), ("x-a", " 1  2 "), ("x-a", "3")]
    assert sigv4.canonical_headers(headers, ("host", "x-a")) == "host:h\nx-a:1 2,3\n"
