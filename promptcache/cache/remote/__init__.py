"""The shared tier: entry bytes in Redis, one cache for many replicas of one model.

``RemoteStore`` is the byte layer: entries as chunked values with checked metadata, expiry at
the entry's wall-clock TTL, extension that never shortens, and cross-replica single-flight
locks. ``RemoteWriter`` runs its writes behind the request path, from a bounded queue. Neither
knows about tiers, entries or payloads: the caller hands in bytes (``KVCodec.encode``) and
metadata, and reads them back the same way. Redis is an optimisation, never a dependency: when
it is down or slow every operation answers at once as a miss or a no-op.
"""

from __future__ import annotations

from promptcache.cache.remote.store import (
    FIELD_EXPIRES_AT,
    FIELD_NCHUNKS,
    FIELD_SHA256,
    FIELD_SIZE,
    FIELD_VERSION,
    VERSION,
    RemoteStats,
    RemoteStore,
)
from promptcache.cache.remote.writer import RemoteWriter

__all__ = [
    "FIELD_EXPIRES_AT",
    "FIELD_NCHUNKS",
    "FIELD_SHA256",
    "FIELD_SIZE",
    "FIELD_VERSION",
    "VERSION",
    "RemoteStats",
    "RemoteStore",
    "RemoteWriter",
]
