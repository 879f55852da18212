"""``Service``: the seam between protocol adapters and the cache and engine.

It is the only module that knows both the cache layer and the engine, and hands payloads
between them. One request::

    layout = render(request)                 tokens, block offsets (per-block tokenization)
    bps    = resolve_breakpoints(...)        validation steps 4-6
    plan   = planner.plan(...)               20-block lookback; refresh; pin the deepest hit
    engine.generate(tokens, reuse=hit)       on the worker thread: restore, prefill, snapshot
    store.put(each written span)             at the exact breakpoint offsets
    Started(usage) -> TextOut... -> Finished
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from promptcache.cache import planner
from promptcache.cache.clock import Clock, WallClock
from promptcache.cache.hashing import Namespace, block_hashes
from promptcache.cache.inflight import InFlight
from promptcache.cache.policy import (
    ANTHROPIC_RULES,
    Breakpoint,
    MarkRules,
    ModelCachePolicy,
    resolve_breakpoints,
)
from promptcache.cache.store import PrefixStore
from promptcache.config import DEFAULT_MODEL_NAME, AwsCredential, ServerConfig
from promptcache.core.layout import PromptLayout, render
from promptcache.core.output import OutputParser
from promptcache.core.request import ChatRequest
from promptcache.core.response import CacheUsage, ChatEvent, Finished, Started, StopReason
from promptcache.engine.base import Engine, EngineRequest, Prefilled, Stopped, TokenOut
from promptcache.errors import (
    AuthenticationFailed,
    EngineFailure,
    NotFound,
    Overloaded,
    PromptCacheError,
    PromptTooLong,
)
from promptcache.metrics import Metrics
from promptcache.types import DEFAULT_TENANT, BlockHash, TenantId
from promptcache.worker import EngineWorker, Job

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 30.0


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated, rendered request."""

    layout: PromptLayout
    breakpoints: list[Breakpoint]


class Service:
    """Serves canonical chat requests from one engine and one prefix store."""

    def __init__(
        self,
        engine: Engine | Callable[[], Engine],
        config: ServerConfig,
        *,
        clock: Clock | None = None,
    ) -> None:
        self._engine: Engine | None = None if callable(engine) else engine
        self._load_engine: Callable[[], Engine] | None = engine if callable(engine) else None
        self.load_error: str | None = None
        self.config = config
        self.clock = clock or WallClock()
        model = config.engine.model
        self.served_model = config.api.served_model_name or (
            DEFAULT_MODEL_NAME if model is None else Path(model.rstrip("/")).stem
        )
        self.policy = ModelCachePolicy(
            min_cacheable_tokens=config.cache.min_cacheable_tokens,
            max_cacheable_tokens=config.cache.max_cacheable_tokens,
            tool_cache_points=config.cache.tool_cache_points,
            ttl_1h=config.cache.ttl_1h,
        )
        self.store = PrefixStore(config.cache.capacity_bytes)
        self.inflight = InFlight()
        self.metrics = Metrics(lambda: {"memory": self.store})
        self.worker = EngineWorker()
        self._sweeper: asyncio.Task[None] | None = None
        self._loader: asyncio.Task[None] | None = None
        self._tenants = dict(config.api.api_keys)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self._engine is not None

    @property
    def engine(self) -> Engine:
        """The loaded engine; raises ``Overloaded`` while the model is still loading."""
        if self._engine is None:
            raise Overloaded(self.load_error or "the model is still loading; retry shortly")
        return self._engine

    async def start(self) -> None:
        """Start the worker and the TTL sweeper, and load the model in the background."""
        self.worker.start()
        self._sweeper = asyncio.create_task(self._sweep())
        if self._load_engine is not None:
            self._loader = asyncio.create_task(self._load())

    async def _load(self) -> None:
        assert self._load_engine is not None
        try:
            self._engine = await asyncio.to_thread(self._load_engine)
        except Exception as exc:
            log.exception("model failed to load")
            self.load_error = f"model failed to load: {exc}"

    async def stop(self) -> None:
        for task in (self._sweeper, self._loader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await asyncio.to_thread(self.worker.stop)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.store.evict_expired(self.clock.now())

    # -- identity ----------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """No credentials configured: everyone is the default tenant on every surface (§1.12)."""
        return not self._tenants and not self.config.api.aws_credentials

    def authenticate(self, credential: str | None) -> TenantId:
        """The tenant of ``credential``; everyone is the default tenant when no keys are set."""
        if self.is_open:
            return DEFAULT_TENANT
        if credential is None or credential not in self._tenants:
            raise AuthenticationFailed("invalid x-api-key")
        return TenantId(self._tenants[credential])

    def aws_credential(self, access_key_id: str) -> AwsCredential:
        """The SigV4 secret and tenant of ``access_key_id``; raises ``AuthenticationFailed``."""
        credential = self.config.api.aws_credentials.get(access_key_id)
        if credential is None:
            raise AuthenticationFailed(f"unknown access key id {access_key_id!r}")
        return credential

    def is_admin(self, credential: str | None) -> bool:
        return credential is not None and credential in self.config.api.admin_keys

    def resolve_model(self, name: str) -> str:
        """The served model for ``name``. Without an alias table every name resolves (§1.4)."""
        aliases = self.config.api.aliases
        if not aliases or name == self.served_model:
            return self.served_model
        if name in aliases:
            return aliases[name]
        raise NotFound(f"model: {name}")

    def model_names(self) -> list[str]:
        return [self.served_model, *sorted(self.config.api.aliases)]

    # -- requests ----------------------------------------------------------------------------

    def prepare(self, request: ChatRequest, rules: MarkRules = ANTHROPIC_RULES) -> Prepared:
        """Validate the breakpoints (spec §1.14 steps 4-6) and render the prompt."""
        breakpoints = resolve_breakpoints(list(request.placed_blocks()), request.auto_cache, rules)
        layout = render(request, self.engine.tokenizer, self.engine.chat_format)
        limit = self.engine.info.max_context_tokens
        if layout.num_tokens >= limit:
            raise PromptTooLong(
                f"prompt is too long: {layout.num_tokens} tokens > {limit - 1} maximum"
            )
        return Prepared(layout, breakpoints)

    async def count_tokens(self, request: ChatRequest, rules: MarkRules = ANTHROPIC_RULES) -> int:
        """``N`` for ``request``; validates like ``generate`` and never touches the cache."""
        return self.prepare(request, rules).layout.num_tokens

    def namespace(self, request: ChatRequest) -> Namespace:
        info = self.engine.info
        return Namespace(request.tenant, info.model_id, info.revision, "", request.partition)

    async def generate(
        self, request: ChatRequest, rules: MarkRules = ANTHROPIC_RULES
    ) -> AsyncIterator[ChatEvent]:
        """Events for ``request``: ``Started``, content pieces, ``Finished``.

        Validation errors are raised before the first event and touch no entry (§1.14).
        """
        t0 = self.clock.now()
        started_at = time.perf_counter()
        prepared = self.prepare(request, rules)
        layout = prepared.layout
        keys = block_hashes(layout.blocks, self.namespace(request))
        plan = await self._plan(prepared, keys, t0)
        # Plan and registration happen in one event-loop step: no other lookup misses between.
        owned = self.inflight.begin(span.key for span in plan.writes)
        hit = plan.hit
        # Logits are needed for the last prompt token: restore at most N - 1 tokens (§2.5).
        reuse_tokens = min(plan.read_tokens, layout.num_tokens - 1) if hit else 0
        engine_request = EngineRequest(
            tokens=layout.tokens,
            sampling=request.sampling,
            reuse=hit.payload if hit else None,
            reuse_tokens=reuse_tokens,
            snapshot_at=[span.offset for span in plan.writes],
        )
        job = None
        try:
            job = self.worker.submit(self.engine.generate(engine_request))
            first = await job.next()
            if not isinstance(first, Prefilled):
                raise EngineFailure("engine did not prefill")
            self._commit(plan, first, request.tenant, t0)
            for key in owned:
                self.inflight.finish(key)
            if hit is not None:
                self.store.unpin(hit)
                hit = None
            yield Started(plan.usage)
            observed = False
            async for event in self._decode(job, request, plan.usage):
                if not observed:  # the first output, or the end of a pre-warm
                    observed = True
                    self.metrics.observe(
                        plan.usage,
                        restored=reuse_tokens,
                        computed=first.num_computed_tokens,
                        ttft_s=time.perf_counter() - started_at,
                    )
                yield event
        except PromptCacheError:
            raise
        except Exception as exc:
            raise EngineFailure(f"generation failed: {exc}") from exc
        finally:
            for key in owned:  # a failed or cancelled writer: its waiters plan again
                self.inflight.finish(key)
            if hit is not None:
                self.store.unpin(hit)
            if job is not None:
                job.cancel()

    async def _plan(
        self, prepared: Prepared, keys: list[BlockHash], t0: float
    ) -> planner.CachePlan:
        """Plan, waiting first for any deeper prefix another request is computing (§1.11).

        A waiter whose writer fails, is cancelled or takes longer than the timeout plans again
        without that key, and may become the writer itself.
        """
        layout = prepared.layout
        ignored: set[BlockHash] = set()
        while True:
            plan = planner.plan(
                keys=keys,
                block_ends=[b.end for b in layout.blocks],
                num_tokens=layout.num_tokens,
                breakpoints=prepared.breakpoints,
                policy=self.policy,
                store=self.store,
                t0=t0,
                now=self.clock.now(),
                pending=_Pending(self.inflight, ignored),
            )
            if plan.wait_for is None:
                return plan
            timeout = self.config.cache.inflight_wait_timeout_s
            if not await self.inflight.wait(plan.wait_for, timeout):
                log.warning("single-flight wait timed out after %.0f s; computing it too", timeout)
                ignored.add(plan.wait_for)

    def _commit(
        self, plan: planner.CachePlan, prefilled: Prefilled, tenant: TenantId, t0: float
    ) -> None:
        now = self.clock.now()
        for span in plan.writes:
            payload = prefilled.snapshots.get(span.offset)
            if payload is None:
                log.error("engine returned no snapshot at offset %d", span.offset)
                continue
            # Usage reports the write even when the budget rejects it: it counts as evicted (§1.13).
            self.store.put(span.key, payload, span.ttl, t0, tenant, now)

    async def _decode(
        self, job: Job, request: ChatRequest, usage: CacheUsage
    ) -> AsyncIterator[ChatEvent]:
        """Content pieces from the engine's tokens, then ``Finished`` with the output count."""
        tokenizer = self.engine.tokenizer
        tool_names = frozenset(b.name for b in request.tools if b.kind == "tool" and b.name)
        parser = OutputParser(request.sampling.stop_sequences, tool_names)
        token_ids: list[int] = []
        reason: StopReason = "end_turn"
        while parser.stop is None:
            event = await job.next()
            if event is None:
                break
            if isinstance(event, Stopped):
                reason = event.reason
                break
            if isinstance(event, TokenOut):
                token_ids.append(event.token_id)
                for piece in parser.feed(tokenizer.decode(token_ids)):
                    yield piece
        stop_sequence = None
        if parser.stop is None:
            for piece in parser.feed(tokenizer.decode(token_ids), final=True):
                yield piece
        else:
            reason = "tool_use" if parser.stop.reason == "tool_use" else "stop_sequence"
            stop_sequence = parser.stop.sequence
        yield Finished(reason, stop_sequence, usage.with_output(len(token_ids)))


@dataclass(frozen=True, slots=True)
class _Pending:
    """In-flight keys, less those a timed-out waiter no longer waits for."""

    inflight: InFlight
    ignored: set[BlockHash]

    def __contains__(self, key: object) -> bool:
        return key in self.inflight and key not in self.ignored


__all__ = ["Prepared", "Service"]
