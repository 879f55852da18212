"""Verification of AWS Signature Version 4 ``Authorization`` headers, as boto3 signs them.

The server rebuilds what the client signed and compares signatures in constant time::

    canonical request  = METHOD \\n canonical URI \\n canonical query \\n
                         canonical headers \\n \\n signed header names \\n payload hash
    string to sign     = AWS4-HMAC-SHA256 \\n x-amz-date \\n date/region/service/aws4_request \\n
                         hex(sha256(canonical request))
    signing key        = HMAC chain over "AWS4"+secret: date, region, service, "aws4_request"
    signature          = hex(HMAC(signing key, string to sign))

The canonical URI is the path *as sent* (still percent-encoded, e.g. ``%3A`` in a model id),
dot segments and repeated slashes removed, then percent-encoded once more: services other than
S3 double-encode, which is what botocore's ``SigV4Auth`` does. Only header authentication is
supported (no presigned query strings).
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

from promptcache.api.bedrock.errors import InvalidSignature
from promptcache.credentials import same_secret

ALGORITHM: Final = "AWS4-HMAC-SHA256"
SERVICE: Final = "bedrock"
"""The signing name of bedrock-runtime in botocore's service model."""

MAX_CLOCK_SKEW_S: Final = 15 * 60
"""How far ``x-amz-date`` may be from the server's clock, as on AWS."""

UNSIGNED_PAYLOAD: Final = "UNSIGNED-PAYLOAD"
_DATE_FORMAT: Final = "%Y%m%dT%H%M%SZ"
_MISMATCH: Final = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method."
)


@dataclass(frozen=True, slots=True)
class SignedAuthorization:
    """The parts of an ``AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...``
    header."""

    access_key_id: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/aws4_request"


def parse_authorization(header: str) -> SignedAuthorization | None:
    """The SigV4 parts of ``header``; ``None`` if it uses another scheme (e.g. ``Bearer``).

    Raises ``InvalidSignature`` for a SigV4 header that is malformed.
    """
    scheme, _, rest = header.strip().partition(" ")
    if scheme != ALGORITHM:
        return None
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, _, value = part.strip().partition("=")
        fields[name] = value
    scope = fields.get("Credential", "").split("/")
    signed = fields.get("SignedHeaders", "")
    signature = fields.get("Signature", "")
    if len(scope) != 5 or scope[4] != "aws4_request" or not signed or not signature:
        raise InvalidSignature(
            "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' "
            "parameters."
        )
    access_key_id, date, region, service, _ = scope
    return SignedAuthorization(
        access_key_id, date, region, service, tuple(signed.split(";")), signature
    )


def canonical_uri(raw_path: str) -> str:
    """The path as sent, dot segments and empty segments removed, percent-encoded again."""
    segments: list[str] = []
    for segment in raw_path.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment and segment != ".":
            segments.append(segment)
    trailing = "/" if raw_path.endswith("/") and segments else ""
    return quote("/" + "/".join(segments) + trailing, safe="/~")


def canonical_query(raw_query: str) -> str:
    """The query string as sent, its ``key=value`` pairs sorted (botocore's URL variant)."""
    if not raw_query:
        return ""
    pairs = sorted(pair.partition("=") for pair in raw_query.split("&"))
    return "&".join(f"{key}={value}" for key, _, value in pairs)


def canonical_headers(headers: Iterable[tuple[str, str]], names: Iterable[str]) -> str:
    """``name:value`` lines of the signed headers; repeated headers joined with commas."""
    values: dict[str, list[str]] = {}
    for name, value in headers:
        values.setdefault(name.lower(), []).append(" ".join(value.split()))
    return "".join(f"{name}:{','.join(values.get(name, []))}\n" for name in names)


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """The derived key: HMAC-SHA256 chained over date, region, service and ``aws4_request``."""
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def verify(
    auth: SignedAuthorization,
    *,
    secret: str,
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    now: float | None = None,
) -> None:
    """Check ``auth`` against the request; raise ``InvalidSignature`` if it does not verify.

    ``headers`` are the received ``(name, value)`` pairs, repeats included; ``now`` (epoch
    seconds, default the wall clock) bounds the age of ``x-amz-date``.
    """
    header_list = list(headers)
    if auth.service != SERVICE:
        raise InvalidSignature(f"Credential should be scoped to correct service: '{SERVICE}'.")
    amz_date = next((v for k, v in header_list if k.lower() == "x-amz-date"), "")
    _check_date(auth, amz_date, time.time() if now is None else now)
    body_hash = hashlib.sha256(body).hexdigest()
    declared = next((v for k, v in header_list if k.lower() == "x-amz-content-sha256"), None)
    if declared is not None and declared not in (UNSIGNED_PAYLOAD, body_hash):
        raise InvalidSignature(
            "The provided 'x-amz-content-sha256' header does not match what was computed."
        )
    canonical = "\n".join(
        [
            method.upper(),
            canonical_uri(raw_path),
            canonical_query(raw_query),
            canonical_headers(header_list, auth.signed_headers),
            ";".join(auth.signed_headers),
            declared or body_hash,
        ]
    )
    to_sign = "\n".join(
        [ALGORITHM, amz_date, auth.scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = signing_key(secret, auth.date, auth.region, auth.service)
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not same_secret(expected, auth.signature):  # any header text: never a TypeError
        raise InvalidSignature(_MISMATCH)


def _check_date(auth: SignedAuthorization, amz_date: str, now: float) -> None:
    try:
        signed_at = calendar.timegm(time.strptime(amz_date, _DATE_FORMAT))
    except ValueError:
        raise InvalidSignature(
            "Authorization header requires existence of a valid 'X-Amz-Date' header."
        ) from None
    if amz_date[:8] != auth.date:
        raise InvalidSignature(
            f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
            f"from HTTP: '{auth.date}' != '{amz_date[:8]}'"
        )
    if abs(now - signed_at) > MAX_CLOCK_SKEW_S:
        server = time.strftime(_DATE_FORMAT, time.gmtime(now))
        raise InvalidSignature(
            f"Signature expired or not yet current: {amz_date} is more than 15 min. "
            f"away from the server time {server}."
        )


__all__ = [
    "ALGORITHM",
    "MAX_CLOCK_SKEW_S",
    "SERVICE",
    "UNSIGNED_PAYLOAD",
    "SignedAuthorization",
    "canonical_headers",
    "canonical_query",
    "canonical_uri",
    "parse_authorization",
    "signing_key",
    "verify",
]
