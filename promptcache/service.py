"""``Service``: the seam between protocol adapters and the cache and engine.

It is the only module that knows both the cache layer and the engine, and hands payloads
between them. One request::

    layout = render(request)                 tokens, block offsets (per-block tokenization)
    bps    = resolve_breakpoints(...)        validation steps 4-6
    share  = shared tier (--redis-url)        on a local miss: index what Redis holds, lock
                                             what this request will write (or wait for the
                                             replica that computes it)
    plan   = planner.plan(...)               20-block lookback; refresh; pin the deepest hit
    reuse  = hit's bytes in engine memory     read from a lower tier, file or Redis; promoted
    engine.add(tokens, reuse=hit)            the worker's loop steps it: restore, prefill, snapshot
    store.put(each written span)             at the exact breakpoint offsets
    Started(usage) -> TextOut... -> Finished
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, replace

from promptcache.bench import prices
from promptcache.cache import planner
from promptcache.cache.clock import Clock, WallClock
from promptcache.cache.copies import DEFAULT_QUEUE, CopyWriter
from promptcache.cache.disk import DiskTier
from promptcache.cache.entry import Entry
from promptcache.cache.hashing import Namespace, block_hashes
from promptcache.cache.inflight import InFlight, Pending
from promptcache.cache.lease import Lease
from promptcache.cache.misses import PromptHistory
from promptcache.cache.policy import (
    Breakpoint,
    MarkRules,
    ModelCachePolicy,
    resolve_breakpoints,
)
from promptcache.cache.profiles import CacheProfile
from promptcache.cache.remote.store import RemoteStore
from promptcache.cache.remote.tier import RemoteTier, namespace
from promptcache.cache.store import PrefixStore
from promptcache.cache.tiers import MemoryTier, Tier, TierStack
from promptcache.config import AwsCredential, CacheConfig, ConfigError, ServerConfig, profile_table
from promptcache.core.detokenize import Detokenizer
from promptcache.core.layout import PromptLayout, render
from promptcache.core.output import OutputParser
from promptcache.core.payload import CorruptPayload, KVCodec, KVPayload
from promptcache.core.request import ChatRequest, Sampling
from promptcache.core.response import (
    CacheUsage,
    ChatEvent,
    Diagnosis,
    Finished,
    Started,
    StopReason,
)
from promptcache.credentials import find_secret, secret_bytes
from promptcache.diagnosis import RecentMessages, shape_of
from promptcache.engine import threads
from promptcache.engine.base import (
    Engine,
    EngineRequest,
    Prefilled,
    PrefillProgress,
    Stopped,
    TokenOut,
)
from promptcache.engine.models import served_name
from promptcache.errors import (
    AuthenticationFailed,
    EngineFailure,
    NotFound,
    Overloaded,
    PromptCacheError,
    PromptTooLong,
)
from promptcache.metrics import Metrics
from promptcache.savings import Ledger
from promptcache.sharing import Prompt, Sharing
from promptcache.templates import Template, TemplateStore
from promptcache.types import DEFAULT_TENANT, BlockHash, Section, TenantId
from promptcache.worker import EngineWorker, Job

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 30.0
LOADING_RETRY_S = 2.0
"""The ``Retry-After`` of an answer while the model loads (a second start takes seconds)."""
_HOSTED_RULES = MarkRules()


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated, rendered request."""

    layout: PromptLayout
    breakpoints: list[Breakpoint]
    policy: ModelCachePolicy

    @property
    def sections(self) -> list[Section]:
        return [block.section for block in self.layout.blocks]


class Service:
    """Serves canonical chat requests from one engine and one prefix store."""

    def __init__(
        self,
        engine: Engine | Callable[[], Engine],
        config: ServerConfig,
        *,
        clock: Clock | None = None,
        on_load_error: Callable[[str], None] | None = None,
    ) -> None:
        """``engine`` is an engine or a thunk that loads one in the background at ``start``;
        when that fails, ``load_error`` says why and ``on_load_error`` is called with it (on the
        event loop): ``promptcache serve`` stops there, as a server without a model is of no
        use, while tests keep the server up to look at ``/health``."""
        self._engine: Engine | None = None if callable(engine) else engine
        self._load_engine: Callable[[], Engine] | None = engine if callable(engine) else None
        self.load_error: str | None = None
        self._on_load_error = on_load_error
        self.config = config
        self.clock = clock or WallClock()
        self.served_model = config.api.served_model_name or served_name(config.engine.model)
        self.profiles = profile_table(config)
        prompts_dir = config.api.prompts_dir
        self.templates = TemplateStore(prompts_dir) if prompts_dir is not None else None
        self.policy = self.profiles.default.policy
        # Tenants share the budget only where there are tenants: credentials are configured.
        credentials = config.api.api_keys or config.api.aws_credentials
        self._tenant_share = config.cache.tenant_cache_share if credentials else None
        # The tiers move bytes through the engine's codec, so the store exists once the engine
        # does; until then readers (metrics, stats, the dashboard) see an empty one.
        self._loading_store = PrefixStore(TierStack(()), tenant_share=self._tenant_share)
        self.remote: RemoteTier | None = None
        """The shared tier (``--redis-url``), once the engine exists; None without one."""
        self.sharing: Sharing | None = None
        """Requests' use of ``remote`` (``sharing.py``)."""
        self.inflight = InFlight()
        self._store = None if self._engine is None else self._open_store(self._engine)
        self.copies: CopyWriter | None = None
        """Writes new memory entries to the disk tier behind the requests (``cache/copies.py``)."""
        self.metrics = Metrics(lambda: self.store, lambda: len(self.inflight), lambda: self.remote)
        self.history = PromptHistory()
        """The tenants' recent prompts (key chains), to explain misses (``cache/misses.py``)."""
        self.messages = RecentMessages()
        """Message ids of requests that asked for Anthropic's diagnostics (spec §3.12)."""
        try:
            sheet = prices.load(config.cache.prices_file)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"price sheet: {exc}") from exc
        self.ledger = Ledger(sheet)
        """Live savings per tenant and in total (``/v1/cache/stats``, the dashboard)."""
        self._fetches: dict[BlockHash, asyncio.Future[KVPayload]] = {}
        self.worker = EngineWorker()
        self._sweeper: asyncio.Task[None] | None = None
        self._loader: asyncio.Task[None] | None = None
        # Secrets are compared with every configured one in constant time (credentials.py).
        self._api_keys = tuple(
            (secret_bytes(key), TenantId(tenant)) for key, tenant in config.api.api_keys.items()
        )
        self._admin_keys = tuple((secret_bytes(key), True) for key in config.api.admin_keys)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self._engine is not None

    @property
    def store(self) -> PrefixStore:
        """The prefix store; while the model loads, an empty one without tiers."""
        return self._loading_store if self._store is None else self._store

    @property
    def engine(self) -> Engine:
        """The loaded engine; raises ``Overloaded`` while the model is still loading."""
        if self._engine is None:
            if self.load_error:
                raise Overloaded(self.load_error, retry_after_s=None)
            loading = "the model is still loading; retry shortly"
            raise Overloaded(loading, retry_after_s=LOADING_RETRY_S)
        return self._engine

    async def start(self) -> None:
        """Start the worker and the TTL sweeper, and load the model in the background."""
        # Work handed to threads (file reads, tier copies, encodes) never slows the engine's
        # kernels down (engine/threads.py).
        asyncio.get_running_loop().set_default_executor(threads.side_executor())
        self.worker.start()
        if self._engine is not None:
            await self._open_tiers()
        self._sweeper = asyncio.create_task(self._sweep())
        if self._load_engine is not None:
            self._loader = asyncio.create_task(self._load())

    async def _load(self) -> None:
        assert self._load_engine is not None
        try:
            engine = await threads.in_own_thread(self._load_engine)
            self._store = self._open_store(engine)
            await self._open_tiers()
            self._engine = engine
        except Exception as exc:
            log.exception("model failed to load")
            self.load_error = f"model failed to load: {exc}"
            if self._on_load_error is not None:
                self._on_load_error(self.load_error)

    async def stop(self) -> None:
        for task in (self._sweeper, self._loader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await asyncio.to_thread(self.worker.stop)
        if self.copies is not None:
            await self.copies.stop()  # the write in progress finishes; persist does the rest
        if self.remote is not None:
            await self.remote.stop()  # queued writes get a few seconds; locks are released
        if self._store is not None and self._store.tiers.copy_tiers:
            # Memory tiers die with the process: keep what fits on disk for the next start.
            moved = self._store.persist(self.clock.now())
            log.info("moved %d cache entries to disk at shutdown", moved)

    def _open_store(self, engine: Engine) -> PrefixStore:
        cache = self.config.cache
        info, codec = engine.info, engine.kv_codec
        if cache.redis_url is not None:
            name = namespace(info.model_id, info.revision, codec.layout)
            self.remote = RemoteTier(
                RemoteStore(
                    cache.redis_url,
                    namespace=name,
                    op_timeout_s=cache.redis_timeout_s,
                    clock=self.clock,
                ),
                codec,
            )
            self.sharing = Sharing(
                self.remote,
                lambda: self.store,
                self.inflight,
                self.clock,
                cache.inflight_wait_timeout_s,
            )
        return PrefixStore(
            tier_stack(cache, info.device, codec, self.remote),
            tenant_share=self._tenant_share,
            write_behind=DEFAULT_QUEUE if cache.disk_write_behind else 0,
        )

    async def _open_tiers(self) -> None:
        """Index what an earlier run left in the tiers that outlive it (the disk), then start
        writing copies of new entries there."""
        store = self.store
        for tier in store.tiers.copy_tiers:
            found = await asyncio.to_thread(tier.scan)
            kept = store.restore(tier, found, self.clock.now())
            log.info("%s tier: %d entries found, %d dropped", tier.name, kept, len(found) - kept)
        if store.copy_queue.limit and store.tiers.copy_tiers:
            self.copies = CopyWriter(store, self.clock.now)
            self.copies.start()
        if self.remote is not None:
            self.remote.start()
            up = await self.remote.store.ping()  # an unreachable Redis is logged now, once
            log.info("shared tier %s (%s)", self.remote.store.namespace, "up" if up else "down")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.store.evict_expired(self.clock.now())

    # -- identity ----------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """No credentials configured: everyone is the default tenant on every surface (§1.12)."""
        return not self._api_keys and not self.config.api.aws_credentials

    def authenticate(self, credential: str | None) -> TenantId:
        """The tenant of ``credential``; everyone is the default tenant when no keys are set."""
        if self.is_open:
            return DEFAULT_TENANT
        tenant = find_secret(self._api_keys, credential)
        if tenant is None:
            raise AuthenticationFailed("invalid x-api-key")
        return tenant

    def aws_credential(self, access_key_id: str) -> AwsCredential:
        """The SigV4 secret and tenant of ``access_key_id``; raises ``AuthenticationFailed``.

        The key id is public (it travels in clear in every request), so a plain lookup is fine;
        the signature made with its secret is what ``sigv4.verify`` compares in constant time.
        """
        credential = self.config.api.aws_credentials.get(access_key_id)
        if credential is None:
            raise AuthenticationFailed(f"unknown access key id {access_key_id!r}")
        return credential

    def is_admin(self, credential: str | None) -> bool:
        return find_secret(self._admin_keys, credential) is not None

    def resolve_model(self, name: str) -> str:
        """The served model for ``name``. Without an alias table every name resolves (§1.4)."""
        aliases = self.config.api.aliases
        if not aliases or name == self.served_model:
            return self.served_model
        if name in aliases:
            return aliases[name]
        raise NotFound(f"model: {name}")

    def profile_for(self, model: str) -> CacheProfile:
        """The caching profile of requests naming ``model`` (``cache/profiles.py``)."""
        return self.profiles.for_model(model)

    def template(self, reference: str, tenant: TenantId) -> Template:
        """The prompt template ``reference`` names that ``tenant`` may use (``templates.py``);
        raises ``NotFound`` (also without ``--prompts-dir``) or ``BadTemplate``."""
        if self.templates is None:
            raise NotFound(
                f"prompt template {reference!r} not found: this server has no --prompts-dir",
                code="prompt_not_found",
            )
        return self.templates.get(reference, tenant, is_open=self.is_open)

    def model_names(self) -> list[str]:
        return [self.served_model, *sorted(self.config.api.aliases)]

    # -- requests ----------------------------------------------------------------------------

    def prepare(self, request: ChatRequest, rules: MarkRules = _HOSTED_RULES) -> Prepared:
        """Validate the breakpoints (spec §1.14 steps 4-6) under the caching profile of the
        model the request names, and render the prompt."""
        profile = self.profile_for(request.model)
        breakpoints = resolve_breakpoints(
            list(request.placed_blocks()), request.auto_cache, profile.rules(rules)
        )
        layout = render(request, self.engine.tokenizer, self.engine.chat_format)
        limit = self.engine.info.max_context_tokens
        if layout.num_tokens >= limit:
            raise PromptTooLong(
                f"prompt is too long: {layout.num_tokens} tokens > {limit - 1} maximum"
            )
        return Prepared(layout, breakpoints, profile.policy)

    async def count_tokens(self, request: ChatRequest, rules: MarkRules = _HOSTED_RULES) -> int:
        """``N`` for ``request``; validates like ``generate`` and never touches the cache."""
        return self.prepare(request, rules).layout.num_tokens

    def namespace(self, request: ChatRequest) -> Namespace:
        info = self.engine.info
        return Namespace(request.tenant, info.model_id, info.revision, "", request.partition)

    @property
    def model_tag(self) -> str:
        """The served weights, for telling ``model_changed`` apart."""
        info = self.engine.info
        return f"{info.model_id}@{info.revision}"

    def _explain(self, request: ChatRequest, prepared: Prepared) -> planner.Explain:
        # Model-neutral keys: the same prompt under another model still matches (model_changed).
        neutral = Namespace(request.tenant, "", "", "", request.partition)
        return planner.Explain(
            tenant=request.tenant,
            model=self.model_tag,
            chain=block_hashes(prepared.layout.blocks, neutral),
            sections=prepared.sections,
            history=self.history,
        )

    def _diagnose(
        self,
        request: ChatRequest,
        prepared: Prepared,
        explain: planner.Explain,
        plan: planner.CachePlan,
    ) -> Diagnosis | None:
        """Anthropic's diagnostics for a request that asked (spec §3.12); it is remembered."""
        ask = request.diagnostics
        if ask is None:
            return None
        usage = plan.usage
        shape = shape_of(
            model=explain.model,
            chain=explain.chain,
            sections=explain.sections,
            ends=[block.end for block in prepared.layout.blocks],
            cached_tokens=usage.read_tokens + usage.written_total,
            uncovered=ask.uncovered,
        )
        diagnosis = self.messages.diagnose(
            request.tenant, ask.previous_message_id, shape, usage.read_tokens
        )
        if ask.message_id:
            self.messages.remember(request.tenant, ask.message_id, shape)
        return diagnosis

    async def generate(
        self, request: ChatRequest, rules: MarkRules = _HOSTED_RULES
    ) -> AsyncIterator[ChatEvent]:
        """Events for ``request``: ``Started``, content pieces, ``Finished``.

        Validation errors are raised before the first event and touch no entry (§1.14).
        """
        t0 = self.clock.now()
        started_at = time.perf_counter()
        prepared = self.prepare(request, rules)
        layout = prepared.layout
        keys = block_hashes(layout.blocks, self.namespace(request))
        explain = self._explain(request, prepared)
        lease = Lease(self.store, self.inflight, self.remote)
        job = None
        try:
            plan, reuse = await self._acquire(prepared, keys, t0, lease, explain, request.tenant)
            diagnosis = self._diagnose(request, prepared, explain, plan)
            # Logits are needed for the last prompt token: restore at most N - 1 tokens (§2.5).
            reuse_tokens = min(plan.read_tokens, layout.num_tokens - 1) if plan.hit else 0
            engine_request = EngineRequest(
                tokens=layout.tokens,
                sampling=self._capped(request.sampling),
                reuse=reuse,
                reuse_tokens=reuse_tokens,
                snapshot_at=[span.offset for span in plan.writes],
            )
            job = self.worker.submit(self.engine, engine_request)
            prefill_from = time.perf_counter()
            # The usage is final with the plan: a stream can start now, before a long prefill,
            # so clients see their first byte (and keep-alives) while the prompt is computed.
            yield Started(plan.usage, plan.misses, plan.read_tier, diagnosis)
            first = await job.next()
            while isinstance(first, PrefillProgress):
                first = await job.next()
            if not isinstance(first, Prefilled):
                raise EngineFailure("engine did not prefill")
            self.ledger.rate.observe(first.num_computed_tokens, time.perf_counter() - prefill_from)
            self._commit(plan, first, request.tenant, t0, lease)
            lease.release()  # the entries are stored and the prefix restored
            observed = False
            async for event in self._decode(job, request, plan.usage):
                if not observed:  # the first output, or the end of a pre-warm
                    observed = True
                    ttft_s = time.perf_counter() - started_at
                    self.metrics.observe(
                        plan.usage,
                        restored=reuse_tokens,
                        computed=first.num_computed_tokens,
                        ttft_s=ttft_s,
                        tier=plan.read_tier,
                        misses=plan.misses,
                    )
                    self.ledger.record(
                        request.tenant,
                        plan.usage,
                        misses=plan.misses,
                        tier=plan.read_tier,
                        ttft_s=ttft_s,
                        now=self.clock.now(),
                    )
                yield event
        except PromptCacheError:
            raise
        except Exception as exc:
            raise EngineFailure(f"generation failed: {exc}") from exc
        finally:
            lease.release()  # a failed or cancelled request: its waiters plan again
            if job is not None:
                job.cancel()

    async def _acquire(
        self,
        prepared: Prepared,
        keys: list[BlockHash],
        t0: float,
        lease: Lease,
        explain: planner.Explain | None = None,
        tenant: TenantId = DEFAULT_TENANT,
    ) -> tuple[planner.CachePlan, KVPayload | None]:
        """Plan, hold the hit's pin and the planned writes in ``lease``, and get the hit's bytes
        into the engine's memory.

        With a shared tier, what Redis holds for the request is indexed first and the keys it
        will write are locked there (``Sharing.prepare``). A hit in a lower tier is read there
        (a file on a worker thread, a Redis value) and promoted. One that proves unusable (a
        corrupt or truncated file, a Redis value gone or damaged) is removed and the request
        plans again, a miss of that entry; its in-flight keys stay held meanwhile, so no other
        request starts computing them. Whatever this raises, the caller releases the lease.
        """
        given_up: set[BlockHash] = set()
        prompt = Prompt(
            keys,
            [b.end for b in prepared.layout.blocks],
            prepared.breakpoints,
            prepared.policy,
            tenant,
        )
        while True:
            if self.sharing is not None:
                await self.sharing.prepare(prompt, lease, given_up)
            plan = await self._plan(prepared, keys, t0, mine=lease.keys, explain=explain)
            # Plan and registration happen in one event-loop step: no lookup misses between.
            lease.hold(plan.hit, (span.key for span in plan.writes))
            # Locks on keys the plan does not write after all go at once (a local request
            # computed them meanwhile): other replicas' waits end with this one's.
            lease.unlock(set(lease.locked) - {span.key for span in plan.writes})
            hit = plan.hit
            if hit is None:
                return plan, None
            resident = self.store.resident(hit)
            if resident is not None:
                return plan, resident
            try:
                return plan, await self._fetch(hit)
            except CorruptPayload as exc:
                log.warning("cache entry unusable, counted as a miss: %s", exc)
                lease.unpin()
                self.store.discard(hit, "corrupt")

    async def _fetch(self, entry: Entry) -> KVPayload:
        """``entry``'s payload in the engine's memory, read once on a worker thread however many
        requests want it, then promoted to the top tier if room can be made. The entry must be
        pinned. Raises ``CorruptPayload``."""
        task = self._fetches.get(entry.key)
        if task is None:
            task = asyncio.ensure_future(asyncio.to_thread(self.store.loader(entry)))
            self._fetches[entry.key] = task
            task.add_done_callback(functools.partial(self._fetched, entry.key))
        payload = await asyncio.shield(task)
        self.store.promote(entry, payload, self.clock.now())
        return payload

    def _fetched(self, key: BlockHash, task: asyncio.Future[KVPayload]) -> None:
        if self._fetches.get(key) is task:
            del self._fetches[key]
        if not task.cancelled():
            task.exception()  # every waiter gets it from its own await; none is left unread

    def _capped(self, sampling: Sampling) -> Sampling:
        """``max_tokens`` within the deployment's ``max_output_tokens``: clients such as Claude
        Code ask for tens of thousands, which a small local model may take literally."""
        cap = self.config.engine.max_output_tokens
        if cap is None or sampling.max_tokens <= cap:
            return sampling
        return replace(sampling, max_tokens=cap)

    async def _plan(
        self,
        prepared: Prepared,
        keys: list[BlockHash],
        t0: float,
        mine: Collection[BlockHash] = (),
        explain: planner.Explain | None = None,
    ) -> planner.CachePlan:
        """Plan, waiting first for any deeper prefix another request is computing (§1.11).

        A waiter whose writer fails, is cancelled or takes longer than the timeout plans again
        without that key, and may become the writer itself. Keys in ``mine`` are this request's
        own writes (when it plans again after a corrupt file): never waited for.
        """
        layout = prepared.layout
        ignored: set[BlockHash] = set(mine)
        while True:
            plan = planner.plan(
                keys=keys,
                block_ends=[b.end for b in layout.blocks],
                num_tokens=layout.num_tokens,
                breakpoints=prepared.breakpoints,
                policy=prepared.policy,
                store=self.store,
                t0=t0,
                now=self.clock.now(),
                pending=Pending(self.inflight, ignored),
                explain=explain,
            )
            if plan.wait_for is None:
                return plan
            timeout = self.config.cache.inflight_wait_timeout_s
            if not await self.inflight.wait(plan.wait_for, timeout):
                log.warning("single-flight wait timed out after %.0f s; computing it too", timeout)
                ignored.add(plan.wait_for)

    def _commit(
        self,
        plan: planner.CachePlan,
        prefilled: Prefilled,
        tenant: TenantId,
        t0: float,
        lease: Lease | None = None,
    ) -> None:
        """Store the snapshots of the planned writes; with a shared tier, queue each new entry
        for Redis, its lock (if this request holds it) released once that write is done."""
        now = self.clock.now()
        for span in plan.writes:
            payload = prefilled.snapshots.get(span.offset)
            if payload is None:
                log.error("engine returned no snapshot at offset %d", span.offset)
                continue
            known = self.store.get(span.key, now)
            # Usage reports the write even when the budget rejects it: it counts as evicted (§1.13).
            entry = self.store.put(span.key, payload, span.ttl, t0, tenant, now)
            if self.sharing is not None and entry is not None and known is None:
                self.sharing.write(entry, lease)

    async def _decode(
        self, job: Job, request: ChatRequest, usage: CacheUsage
    ) -> AsyncIterator[ChatEvent]:
        """Content pieces from the engine's tokens, then ``Finished`` with the output count."""
        tokenizer = self.engine.tokenizer
        tool_names = frozenset(b.name for b in request.tools if b.kind == "tool" and b.name)
        parser = OutputParser(request.sampling.stop_sequences, tool_names)
        text = Detokenizer(tokenizer)
        token_ids = text.token_ids
        reason: StopReason = "end_turn"
        while parser.stop is None:
            event = await job.next()
            if event is None:
                break
            if isinstance(event, Stopped):
                reason = event.reason
                if reason == "max_tokens" and len(token_ids) < request.sampling.max_tokens:
                    # The deployment's max_output_tokens ended the turn, not the client's limit:
                    # "max_tokens" would tell the client its own budget ran out (Claude Code
                    # then retries with a larger one), so the turn is reported as ended.
                    reason = "end_turn"
                break
            if isinstance(event, TokenOut):
                for piece in parser.feed(text.push(event.token_id)):
                    yield piece
        stop_sequence = None
        if parser.stop is None:
            for piece in parser.feed(text.finish(), final=True):
                yield piece
        else:
            reason = "tool_use" if parser.stop.reason == "tool_use" else "stop_sequence"
            stop_sequence = parser.stop.sequence
        yield Finished(reason, stop_sequence, usage.with_output(len(token_ids)))


def tier_stack(
    config: CacheConfig, device: str, codec: KVCodec, remote: RemoteTier | None = None
) -> TierStack:
    """The tiers for an engine on ``device`` moving bytes with ``codec``: ``device`` (CUDA
    memory, ``cache_memory``) and ``host`` (``host_cache_memory``, if set), or on a CPU engine a
    single ``host`` tier (its memory is host memory: ``cache_memory``), then ``disk`` when a
    directory is configured, then the shared ``remote`` tier when given."""
    tiers: list[Tier] = []
    if device.startswith("cuda"):
        tiers.append(MemoryTier("device", config.capacity_bytes, codec))
        if config.host_capacity_bytes > 0:
            tiers.append(MemoryTier("host", config.host_capacity_bytes, codec))
    else:
        if config.host_capacity_bytes > 0:
            log.warning("host_cache_memory is ignored on a CPU engine: cache_memory is host RAM")
        tiers.append(MemoryTier("host", config.capacity_bytes, codec))
    if config.disk_dir is not None:
        tiers.append(DiskTier(config.disk_dir, config.disk_capacity_bytes, codec))
    if remote is not None:
        tiers.append(remote)
    return TierStack(tiers)


__all__ = ["CacheProfile", "MarkRules", "ModelCachePolicy", "Prepared", "Service", "tier_stack"]
