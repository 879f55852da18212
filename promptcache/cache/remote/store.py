"""``RemoteStore``: the bytes of cache entries in Redis, shared by every replica of one model.

Keys, for an entry ``key`` (a ``BlockHash``, in hex) in the caller's ``namespace``::

    promptcache:<namespace>:{<key>}:meta   hash: the caller's metadata plus remote.version,
                                           remote.nchunks, remote.size, remote.sha256
    promptcache:<namespace>:{<key>}:<i>    string: bytes [i * chunk, (i + 1) * chunk) of the value
    promptcache:<namespace>:{<key>}:lock   string: the replica computing the entry now

The namespace (model, revision and the codec's ``layout``) keeps replicas that cannot read each
other's bytes apart. The braces are a Redis Cluster hash tag: an entry's keys share one slot, so
its MULTI and scripts stay legal on a cluster too. Values are split into chunks because Redis
caps a string (512 MiB by default) and a big reply stalls every other client of the server.

Every key of an entry expires at the entry's wall-clock expiry (``PEXPIREAT``), so Redis drops
expired entries by itself, exactly when the entry's TTL ends (replicas and Redis are assumed to
keep NTP time). ``extend`` only ever moves an expiry later (``PEXPIREAT ... GT``), so replicas
refreshing one entry at different times never shorten it.

Redis is an optimisation, never a dependency: every operation has a deadline, and the first
connection error or timeout marks the store down (logged once, with the reason). While down,
operations answer at once as misses or no-ops; after ``retry_s`` (doubling up to
``max_retry_s`` while it stays down) one operation tries again, and its success brings the
store back (logged once). Nothing here raises a Redis error to the caller.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig
from redis.retry import Retry
from redis.typing import EncodableT

from promptcache.cache.clock import Clock, WallClock
from promptcache.types import BlockHash

log = logging.getLogger(__name__)

T = TypeVar("T")

VERSION: Final = "1"
"""Format of an entry's keys and fields; a value of another version reads as corrupt."""

FIELD_VERSION: Final = "remote.version"
FIELD_NCHUNKS: Final = "remote.nchunks"
FIELD_SIZE: Final = "remote.size"
FIELD_SHA256: Final = "remote.sha256"
FIELD_EXPIRES_AT: Final = "remote.expires_at"
"""Added by ``get`` and ``metas``: the entry's expiry in epoch seconds, as Redis holds it now."""

_RESERVED: Final = "remote."
MIB: Final = 1 << 20
MAX_CHUNK_BYTES: Final = 512 * MIB
"""Redis's default ``proto-max-bulk-len``: no string may be larger."""
MAX_CHUNKS: Final = 1 << 16
"""A value claiming more chunks is foreign (with 8 MiB chunks that is 512 GiB)."""
_INLINE_BYTES: Final = MIB
"""Values up to this size are joined and hashed on the event loop; larger ones on a thread."""

# Unreachable or too slow: the store goes down. Other Redis errors (a refused command, a full
# server) fail that operation only.
_DOWN_ERRORS = (redis_errors.ConnectionError, redis_errors.TimeoutError, TimeoutError, OSError)

# Moves the expiry of the meta key and of every chunk later, never earlier. KEYS[1]: meta;
# ARGV: expiry (epoch ms), the nchunks field, the chunk key prefix, the chunk cap.
_EXTEND = """
local n = tonumber(redis.call('HGET', KEYS[1], ARGV[2]))
if not n or n < 0 or n > tonumber(ARGV[4]) then return 0 end
local moved = redis.call('PEXPIREAT', KEYS[1], ARGV[1], 'GT')
for i = 0, n - 1 do redis.call('PEXPIREAT', ARGV[3] .. i, ARGV[1], 'GT') end
return moved
"""

# Deletes an entry's meta and every chunk its meta names. KEYS[1]: meta; ARGV: the nchunks
# field, the chunk key prefix, the chunk cap.
_DELETE = """
local n = tonumber(redis.call('HGET', KEYS[1], ARGV[1])) or 0
if n < 0 or n > tonumber(ARGV[3]) then n = 0 end
local removed = redis.call('DEL', KEYS[1])
for i = 0, n - 1 do redis.call('DEL', ARGV[2] .. i) end
return removed
"""

# Deletes a lock only if ``owner`` still holds it: a replica whose lock expired and was taken
# by another must not release the other's lock. KEYS[1]: lock; ARGV[1]: owner.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(slots=True)
class RemoteStats:
    """Counters since start, for metrics (read them at scrape time; never reset)."""

    writes: int = 0
    """Values stored by ``put``."""
    extends: int = 0
    """``extend`` calls that moved an expiry later."""
    dropped: int = 0
    """Writes not done: the writer's queue was full, or it stopped before reaching them."""
    errors: int = 0
    """Operations that failed: Redis unreachable, too slow, or refusing the command."""
    skipped: int = 0
    """Operations answered at once because the store was down."""
    hits: int = 0
    misses: int = 0
    """``get`` calls that returned nothing: absent, corrupt, failed or skipped while down."""
    corrupt: int = 0
    """Values found partial, damaged or foreign, and deleted (each is a miss too)."""
    bytes_written: int = 0
    bytes_read: int = 0


@dataclass(frozen=True, slots=True)
class _Keys:
    meta: str
    chunk_prefix: str
    lock: str

    def chunk(self, i: int) -> str:
        return f"{self.chunk_prefix}{i}"


class _Corrupt(Exception):
    """A stored value that cannot be used; the message says why."""


class RemoteStore:
    """Entry bytes in Redis at ``url`` (``redis://[user:password@]host:port/db``,
    ``rediss://`` for TLS, or ``unix://``), under ``namespace``. Needs Redis 7 or later.

    Construction does not connect; the first operation does. Use from one event loop. Call
    ``close`` when done.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str,
        chunk_bytes: int = 8 * MIB,
        op_timeout_s: float = 0.5,
        transfer_bytes_per_s: float = 100e6,
        retry_s: float = 1.0,
        max_retry_s: float = 10.0,
        clock: Clock | None = None,
    ) -> None:
        """``op_timeout_s`` bounds each operation, plus ``len / transfer_bytes_per_s`` for the
        bytes it moves (a 100 MB value may take a second on a busy network without Redis being
        down). ``clock`` (wall clock by default) tells whether an expiry is still ahead."""
        if not namespace or "{" in namespace or "}" in namespace:
            raise ValueError(f"namespace must be non-empty and without braces: {namespace!r}")
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in (0, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
        if op_timeout_s <= 0 or transfer_bytes_per_s <= 0 or not 0 < retry_s <= max_retry_s:
            raise ValueError("timeouts, rates and retry intervals must be positive")
        self.namespace = namespace
        self.chunk_bytes = chunk_bytes
        self.clock: Clock = clock or WallClock()
        self.stats = RemoteStats()
        self._url = redact(url)
        self._op_timeout_s = op_timeout_s
        self._bytes_per_s = transfer_bytes_per_s
        self._retry_s = retry_s
        self._max_retry_s = max_retry_s
        # No retries inside redis-py (its default retries with backoff for seconds): a failed
        # operation is a miss at once, and the store's own down state paces the retries. No
        # socket timeout either: redis-py applies it to a whole send or reply, which a large
        # value may rightly exceed; each operation's deadline grows with its bytes instead.
        self._redis = Redis.from_url(
            url,
            socket_connect_timeout=op_timeout_s,
            socket_timeout=None,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=30,
            # Redis Enterprise's maintenance events: off, which spares every new connection a
            # command that open-source Redis refuses.
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
        )
        self._extend = self._redis.register_script(_EXTEND)
        self._delete = self._redis.register_script(_DELETE)
        self._unlock = self._redis.register_script(_UNLOCK)
        self._up = True
        self._probing = False
        self._retry_at = 0.0  # time.monotonic() of the next try while down
        self._backoff = retry_s
        self._down_since = 0.0
        self._reported: set[str] = set()

    # --- health ----------------------------------------------------------------------------

    @property
    def is_up(self) -> bool:
        """False from a connection error or timeout until an operation succeeds again."""
        return self._up

    @property
    def available(self) -> bool:
        """Whether the next operation will reach for Redis: up, or down with a retry due. The
        writer skips encoding values that would only be dropped."""
        return self._up or (not self._probing and time.monotonic() >= self._retry_at)

    async def ping(self) -> bool:
        """Whether Redis answers now (also the retry while down, when one is due)."""

        async def body(_: asyncio.Timeout) -> bool:
            return bool(await self._redis.ping())

        return await self._attempt("ping", body, False)

    async def close(self) -> None:
        """Close the connections."""
        await self._redis.aclose()

    async def _attempt(
        self, op: str, body: Callable[[asyncio.Timeout], Awaitable[T]], default: T
    ) -> T:
        """``body`` under the operation deadline (it may push the deadline for bytes it moves),
        or ``default`` at once while down, or when it fails."""
        probe = False
        if not self._up:
            if self._probing or time.monotonic() < self._retry_at:
                self.stats.skipped += 1
                return default
            # One operation at a time tries a down server, so requests waiting on a dead host
            # pay at most one timeout per retry interval between them.
            self._probing = probe = True
        try:
            async with asyncio.timeout(self._op_timeout_s) as deadline:
                result = await body(deadline)
        except _DOWN_ERRORS as exc:
            self._went_down(op, exc, probe)
            return default
        except redis_errors.RedisError as exc:
            self.stats.errors += 1
            # Once per kind of error: a full server refuses every write, and says so once.
            kind = f"{op} {type(exc).__name__}"
            level = logging.DEBUG if kind in self._reported else logging.WARNING
            self._reported.add(kind)
            log.log(level, "Redis at %s: %s failed: %s", self._url, op, exc)
            return default
        finally:
            if probe:
                self._probing = False
        if not self._up:
            self._up = True
            log.warning(
                "Redis at %s is back after %.1f s; the shared tier is on again",
                self._url,
                time.monotonic() - self._down_since,
            )
        return result

    def _went_down(self, op: str, exc: BaseException, probe: bool) -> None:
        self.stats.errors += 1
        now = time.monotonic()
        if self._up:
            self._up = False
            self._down_since = now
            self._backoff = self._retry_s
            reason = str(exc) or type(exc).__name__
            log.warning(
                "Redis at %s is unreachable (%s during %s); the shared tier is off, "
                "retrying every %g s up to %g s",
                self._url,
                reason,
                op,
                self._retry_s,
                self._max_retry_s,
            )
        elif probe:
            self._backoff = min(2 * self._backoff, self._max_retry_s)
        else:
            return  # an operation begun before the outage: it says nothing new
        self._retry_at = now + self._backoff

    def _allow(self, deadline: asyncio.Timeout, nbytes: int) -> None:
        """Push ``deadline`` by the time ``nbytes`` may take to move."""
        when = deadline.when()
        if when is not None:
            deadline.reschedule(when + nbytes / self._bytes_per_s)

    # --- entries ---------------------------------------------------------------------------

    def keys(self, key: BlockHash) -> tuple[str, str, str]:
        """The meta key, the prefix of the chunk keys (``<prefix><i>``) and the lock key."""
        k = self._keys(key)
        return k.meta, k.chunk_prefix, k.lock

    def _keys(self, key: BlockHash) -> _Keys:
        base = f"promptcache:{self.namespace}:{{{key.hex()}}}:"
        return _Keys(base + "meta", base, base + "lock")

    async def put(
        self, key: BlockHash, data: bytes, meta: Mapping[str, str], expires_at: float
    ) -> bool:
        """Store ``data`` with ``meta`` until ``expires_at`` (epoch seconds), replacing any value
        under ``key``. False when not stored: the expiry is already past, or Redis failed.

        Chunks and meta go in one MULTI, meta last, so no reader ever sees a meta without its
        chunks; every key gets the same ``PEXPIREAT``. A replaced value with more chunks leaves
        its extra chunks to expire with their TTL. Raises ``ValueError`` for metadata names
        starting with ``remote.`` (the store's own).
        """
        if reserved := [name for name in meta if name.startswith(_RESERVED)]:
            raise ValueError(f"metadata names starting with {_RESERVED!r} are reserved: {reserved}")
        at_ms = math.floor(expires_at * 1000)
        if at_ms <= math.floor(self.clock.now() * 1000):
            return False
        if not self.available:  # skip the hashing too
            self.stats.skipped += 1
            return False
        k = self._keys(key)
        view = memoryview(data)
        chunks = [view[i : i + self.chunk_bytes] for i in range(0, len(data), self.chunk_bytes)]
        fields: dict[EncodableT, EncodableT] = dict(meta.items())
        fields.update(
            {
                FIELD_VERSION: VERSION,
                FIELD_NCHUNKS: str(len(chunks)),
                FIELD_SIZE: str(len(data)),
                FIELD_SHA256: await _sha256(data),
            }
        )

        async def body(deadline: asyncio.Timeout) -> bool:
            self._allow(deadline, len(data))
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(k.meta)  # no field of a replaced value survives
                for i, chunk in enumerate(chunks):
                    pipe.set(k.chunk(i), chunk, pxat=at_ms)
                pipe.hset(k.meta, mapping=fields)
                pipe.pexpireat(k.meta, at_ms)
                await pipe.execute()
            return True

        stored = await self._attempt("put", body, False)
        if stored:
            self.stats.writes += 1
            self.stats.bytes_written += len(data)
        return stored

    async def get(self, key: BlockHash) -> tuple[dict[str, str], bytes] | None:
        """The metadata (the caller's plus the ``remote.*`` fields, ``FIELD_EXPIRES_AT``
        included) and bytes under ``key``, or None. Two round trips: meta, then every chunk.
        A partial, damaged or foreign value is a miss, counted and deleted; one replaced or
        expired between the two is a plain miss."""

        async def body(deadline: asyncio.Timeout) -> tuple[dict[str, str], bytes] | None:
            k = self._keys(key)
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(k.meta)
                pipe.pexpiretime(k.meta)
                raw, expire_ms = await pipe.execute()
            if not raw:
                return None
            try:
                meta, nchunks, size = _parse_meta(raw, expire_ms)
                self._allow(deadline, size)
                # The checksum again with the chunks, atomically: a value replaced or expired
                # since the meta was read is a plain miss, not damage to delete.
                names = [k.chunk(i) for i in range(nchunks)]
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.hget(k.meta, FIELD_SHA256)
                    if names:
                        pipe.mget(names)
                    sha, *replies = await pipe.execute()
                if sha != meta[FIELD_SHA256].encode():
                    return None
                chunks = [c for c in replies[0] if isinstance(c, bytes)] if names else []
                if len(chunks) != nchunks:
                    raise _Corrupt("a chunk is missing")
                data, digest = await _join(chunks, size)
                if len(data) != size:
                    raise _Corrupt(f"{len(data)} bytes, meta says {size}")
                if digest != meta[FIELD_SHA256]:
                    raise _Corrupt("checksum mismatch")
            except _Corrupt as exc:
                self.stats.corrupt += 1
                log.warning("dropping shared cache entry %s: %s", key.hex()[:12], exc)
                args: list[EncodableT] = [FIELD_NCHUNKS, k.chunk_prefix, MAX_CHUNKS]
                await self._delete(keys=[k.meta], args=args)
                return None
            return meta, data

        found = await self._attempt("get", body, None)
        if found is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
            self.stats.bytes_read += len(found[1])
        return found

    async def metas(self, keys: Sequence[BlockHash]) -> dict[BlockHash, dict[str, str]]:
        """The metadata of those ``keys`` whose entries exist, as ``get`` returns it, in one
        round trip (a request probes its whole block chain at once). A foreign or damaged meta
        is left out here; ``get`` deletes it."""
        if not keys:
            return {}

        async def body(_: asyncio.Timeout) -> dict[BlockHash, dict[str, str]]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    meta_key = self._keys(key).meta
                    pipe.hgetall(meta_key)
                    pipe.pexpiretime(meta_key)
                replies = await pipe.execute()
            found = {}
            for i, key in enumerate(keys):
                raw, expire_ms = replies[2 * i], replies[2 * i + 1]
                if raw:
                    try:
                        found[key] = _parse_meta(raw, expire_ms)[0]
                    except _Corrupt:
                        continue
            return found

        return await self._attempt("metas", body, {})

    async def extend(self, key: BlockHash, expires_at: float) -> bool:
        """Move the expiry of ``key``'s entry to ``expires_at`` if that is later than it is; never
        earlier. True when it moved."""
        k = self._keys(key)
        at_ms = math.floor(expires_at * 1000)

        async def body(_: asyncio.Timeout) -> bool:
            args: list[EncodableT] = [at_ms, FIELD_NCHUNKS, k.chunk_prefix, MAX_CHUNKS]
            return bool(await self._extend(keys=[k.meta], args=args))

        moved = await self._attempt("extend", body, False)
        if moved:
            self.stats.extends += 1
        return moved

    async def delete(self, key: BlockHash) -> bool:
        """Remove ``key``'s entry (meta and chunks). True when there was one."""
        k = self._keys(key)

        async def body(_: asyncio.Timeout) -> bool:
            args: list[EncodableT] = [FIELD_NCHUNKS, k.chunk_prefix, MAX_CHUNKS]
            return bool(await self._delete(keys=[k.meta], args=args))

        return await self._attempt("delete", body, False)

    # --- single flight across replicas -----------------------------------------------------

    async def try_lock(self, key: BlockHash, owner: str, ttl_ms: int) -> bool:
        """Claim the right to compute ``key``'s entry for ``ttl_ms`` (``SET NX PX``). True when
        ``owner`` got it, and also when Redis cannot be asked (down or failing): single flight
        across replicas saves work, and no replica may wait for a lock nobody can hold."""
        if not owner or ttl_ms <= 0:
            raise ValueError("a lock needs an owner and a positive ttl")
        lock = self._keys(key).lock

        async def body(_: asyncio.Timeout) -> bool:
            return bool(await self._redis.set(lock, owner, nx=True, px=ttl_ms))

        return await self._attempt("try_lock", body, True)

    async def unlock(self, key: BlockHash, owner: str) -> bool:
        """Release ``key``'s lock if ``owner`` holds it (compare and delete in one script, so a
        lock another replica took after ours expired stays). True when released."""
        lock = self._keys(key).lock

        async def body(_: asyncio.Timeout) -> bool:
            return bool(await self._unlock(keys=[lock], args=[owner]))

        return await self._attempt("unlock", body, False)

    async def lock_holder(self, key: BlockHash) -> str | None:
        """The owner holding ``key``'s lock, or None (also when Redis cannot be asked)."""
        lock = self._keys(key).lock

        async def body(_: asyncio.Timeout) -> str | None:
            owner = await self._redis.get(lock)
            return owner.decode(errors="replace") if isinstance(owner, bytes) else owner

        return await self._attempt("lock_holder", body, None)


def _parse_meta(raw: Mapping[bytes, bytes], expire_ms: int) -> tuple[dict[str, str], int, int]:
    """The metadata of a meta hash with its expiry, its chunk count and size; ``_Corrupt`` when
    it is not of this version or its numbers do not add up."""
    try:
        meta = {k.decode(): v.decode() for k, v in raw.items()}
        if meta.get(FIELD_VERSION) != VERSION:
            raise _Corrupt(f"format {meta.get(FIELD_VERSION)!r}, not {VERSION!r}")
        nchunks, size = int(meta[FIELD_NCHUNKS]), int(meta[FIELD_SIZE])
        if FIELD_SHA256 not in meta:
            raise KeyError(FIELD_SHA256)
    except (UnicodeDecodeError, KeyError, ValueError) as exc:
        raise _Corrupt(f"bad meta ({exc!r})") from exc
    if not (0 <= nchunks <= MAX_CHUNKS and 0 <= size <= nchunks * MAX_CHUNK_BYTES) or (
        (size == 0) != (nchunks == 0)
    ):
        raise _Corrupt(f"{nchunks} chunks for {size} bytes")
    if expire_ms > 0:
        meta[FIELD_EXPIRES_AT] = repr(expire_ms / 1000)
    return meta, nchunks, size


async def _sha256(data: bytes) -> str:
    if len(data) <= _INLINE_BYTES:
        return hashlib.sha256(data).hexdigest()
    return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())


async def _join(chunks: Sequence[bytes], size: int) -> tuple[bytes, str]:
    """The chunks joined, and their SHA-256; off the event loop when large."""

    def run() -> tuple[bytes, str]:
        data = b"".join(chunks)
        return data, hashlib.sha256(data).hexdigest()

    return run() if size <= _INLINE_BYTES else await asyncio.to_thread(run)


def redact(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (URLs are logged)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


__all__ = [
    "FIELD_EXPIRES_AT",
    "FIELD_NCHUNKS",
    "FIELD_SHA256",
    "FIELD_SIZE",
    "FIELD_VERSION",
    "MAX_CHUNKS",
    "MAX_CHUNK_BYTES",
    "VERSION",
    "RemoteStats",
    "RemoteStore",
    "redact",
]
