"""The ``Engine`` contract (``promptcache/engine/base.py``), run against every engine.

Each test runs once per engine in ``ENGINES``: the fake engine, and ``PagedEngine`` on a tiny
Llama (full attention) and a tiny Gemma 3 (sliding-window and full layers). A new engine
(llama.cpp, vLLM) joins by adding a case to the ``subject`` fixture: these tests are what it
must honour for the service to drive it. Every event an engine produces here goes through
``Run``, which checks the per-sequence grammar as it arrives::

    PrefillProgress* -> Prefilled -> TokenOut* -> Stopped, then nothing

Engines are module-scoped (building a model costs more than most tests), so every test leaves
its engine idle; the ``idle`` fixture checks that and cancels leftovers of a failed test.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from promptcache.core.payload import CorruptPayload, KVPayload, PartId
from promptcache.core.request import Sampling
from promptcache.engine.base import (
    Engine,
    EngineEvent,
    EngineRequest,
    Prefilled,
    PrefillProgress,
    SeqId,
    Stopped,
    TokenOut,
)
from promptcache.engine.fake import FakeEngine
from promptcache.engine.hf.testing import TINY_SLIDING_WINDOW, build_tiny_engine, random_prompt
from promptcache.errors import PromptTooLong

ENGINES = ["fake", "llama", "gemma3"]
W = TINY_SLIDING_WINDOW
N = 5 * W + 3  # several sliding windows, blocks and prefill steps long
OFFSETS = (W + 5, 3 * W - 3, N)  # inside windows and blocks, the last one the whole prompt
MAX_STEPS = 10_000  # a run that takes more steps than this is stuck

_live: set[SeqId] = set()
"""Sequences of every ``Run`` not yet ended: the ``engine`` fixture cancels them after a test
that failed midway, so the next test finds its module-scoped engine idle."""


@dataclass
class Subject:
    """An engine under test, with what the contract needs to observe and the protocol does not
    expose: how many prompt tokens it has run through its model (when, and how much, work
    happened)."""

    name: str
    engine: Engine
    prefilled_tokens: Callable[[], int]


@pytest.fixture(scope="module", params=ENGINES)
def subject(request: pytest.FixtureRequest) -> Subject:
    if request.param == "fake":
        # Chunked like the tiny engines (64 tokens a step), so that its prefills of N tokens
        # also span several steps.
        fake = FakeEngine(prefill_chunk_tokens=32)
        return Subject("fake", fake, lambda: fake.num_prefill_tokens_total)
    paged = build_tiny_engine(request.param)
    return Subject(request.param, paged, lambda: paged.num_prefill_tokens_total)


@pytest.fixture
def engine(subject: Subject) -> Iterator[Engine]:
    """The subject's engine, checked idle after the test."""
    yield subject.engine
    for seq in list(_live):
        subject.engine.cancel(seq)
    _live.clear()
    assert subject.engine.num_running == 0, "the test left sequences running"


def greedy(max_tokens: int) -> Sampling:
    return Sampling(max_tokens=max_tokens, temperature=0.0)


# --- the grammar ---------------------------------------------------------------------------------


@dataclass
class Run:
    """Sequences added to one engine and stepped together. Every event is checked against the
    grammar and the sequence's request as it arrives."""

    engine: Engine
    events: dict[SeqId, list[EngineEvent]] = field(default_factory=dict)
    requests: dict[SeqId, EngineRequest] = field(default_factory=dict)
    ended: set[SeqId] = field(default_factory=set)

    def add(self, request: EngineRequest) -> SeqId:
        seq = self.engine.add(request)
        assert seq not in self.events, f"sequence id {seq} handed out twice"
        self.events[seq] = []
        self.requests[seq] = request
        _live.add(seq)
        return seq

    def cancel(self, seq: SeqId) -> None:
        self.engine.cancel(seq)
        self._end(seq)

    def _end(self, seq: SeqId) -> None:
        self.ended.add(seq)
        _live.discard(seq)

    @property
    def running(self) -> set[SeqId]:
        return set(self.events) - self.ended

    def step(self) -> None:
        for seq, item in self.engine.step():
            assert seq in self.events, f"{item!r} for sequence {seq}, never added"
            assert seq not in self.ended, f"{item!r} for sequence {seq} after it ended"
            if isinstance(item, Exception):
                raise item
            check_next(self.events[seq], item, self.requests[seq])
            self.events[seq].append(item)
            if isinstance(item, Stopped):
                self._end(seq)

    def finish(self) -> None:
        """Step until every sequence ended; the engine is idle then."""
        for _ in range(MAX_STEPS):
            if not self.running:
                break
            self.step()
        assert not self.running, f"sequences {self.running} still running after {MAX_STEPS} steps"
        assert self.engine.num_running == 0
        assert self.engine.step() == []


def check_next(before: Sequence[EngineEvent], event: EngineEvent, request: EngineRequest) -> None:
    """Whether ``event`` may follow ``before`` in the events of ``request``."""
    last = before[-1] if before else None
    max_tokens = request.sampling.max_tokens
    if last is None or isinstance(last, PrefillProgress):
        assert isinstance(event, PrefillProgress | Prefilled), f"{event!r} before Prefilled"
        if isinstance(event, PrefillProgress):
            assert 0 < event.num_done_tokens < event.num_total_tokens, event
            if last is not None:
                assert event.num_done_tokens > last.num_done_tokens, (last, event)
                assert event.num_total_tokens == last.num_total_tokens, (last, event)
        else:
            if last is not None:
                assert event.num_computed_tokens == last.num_total_tokens, (last, event)
            check_snapshots(event, request)
        return
    assert isinstance(event, TokenOut | Stopped), f"{event!r} after {last!r}"
    produced = sum(isinstance(e, TokenOut) for e in before)
    if isinstance(event, TokenOut):
        assert produced < max_tokens, f"more than max_tokens={max_tokens} tokens"
    elif max_tokens == 0:
        assert event == Stopped("max_tokens") and isinstance(last, Prefilled), event
    elif event.reason == "max_tokens":
        assert produced == max_tokens, f"stopped at max_tokens after {produced} tokens"


def check_snapshots(event: Prefilled, request: EngineRequest) -> None:
    """Exactly the requested snapshots, each of ``offset`` tokens, its parts its bytes."""
    assert sorted(event.snapshots) == sorted(set(request.snapshot_at))
    for offset, payload in event.snapshots.items():
        assert isinstance(payload, KVPayload)
        assert payload.num_tokens == offset
        assert payload.nbytes > 0
        assert sum(size for _, size in payload.parts) == payload.nbytes


def solo(engine: Engine, request: EngineRequest) -> list[EngineEvent]:
    """The events of ``request`` run alone."""
    run = Run(engine)
    seq = run.add(request)
    run.finish()
    return run.events[seq]


def prefilled(events: Sequence[EngineEvent]) -> Prefilled:
    (event,) = [e for e in events if isinstance(e, Prefilled)]
    return event


def token_ids(events: Sequence[EngineEvent]) -> list[int]:
    return [e.token_id for e in events if isinstance(e, TokenOut)]


def assert_same_outcome(
    got: Sequence[EngineEvent], expected: Sequence[EngineEvent], what: str = ""
) -> None:
    """The same tokens, stop and computed tokens; prefill progress may differ (a batch shares
    each step's token budget, so chunks are cut elsewhere)."""
    assert token_ids(got) == token_ids(expected), what
    assert got[-1] == expected[-1], what
    assert prefilled(got).num_computed_tokens == prefilled(expected).num_computed_tokens, what


def long_reply_prompt(engine: Engine, n: int, min_tokens: int = 4) -> list[int]:
    """A prompt of ``n`` tokens whose greedy reply runs ``min_tokens`` or more (an engine may
    end a reply early: the fake does, by design, and so might a model on an end-of-turn)."""
    for seed in range(100, 150):
        tokens = random_prompt(n, seed=seed)
        if len(token_ids(solo(engine, EngineRequest(tokens, greedy(min_tokens))))) == min_tokens:
            return tokens
    raise AssertionError(f"no prompt with a reply of {min_tokens} tokens")


# --- the loop ------------------------------------------------------------------------------------


def test_step_with_nothing_running_returns_nothing(engine: Engine) -> None:
    assert engine.num_running == 0
    assert engine.step() == []


def test_add_is_lazy_and_cancel_is_idempotent(subject: Subject, engine: Engine) -> None:
    before = subject.prefilled_tokens()
    first = engine.add(EngineRequest(random_prompt(N, seed=2), greedy(4)))
    second = engine.add(EngineRequest(random_prompt(N, seed=3), greedy(4)))
    assert first != second
    assert engine.num_running == 2
    assert subject.prefilled_tokens() == before, "add ran the model"
    engine.cancel(first)
    assert engine.num_running == 1
    engine.cancel(second)
    assert engine.num_running == 0
    assert engine.step() == []
    assert subject.prefilled_tokens() == before, "a cancelled request ran the model"
    engine.cancel(first)  # cancelling an ended or unknown sequence does nothing
    engine.cancel(max(first, second) + 1000)
    assert engine.num_running == 0


def test_cold_run_events_and_snapshots(subject: Subject, engine: Engine) -> None:
    tokens = random_prompt(N, seed=4)
    before = subject.prefilled_tokens()
    events = solo(engine, EngineRequest(tokens, greedy(16), snapshot_at=OFFSETS))
    done = prefilled(events)
    assert done.num_computed_tokens == N
    assert subject.prefilled_tokens() - before == N
    assert sorted(done.snapshots) == sorted(OFFSETS)
    assert isinstance(events[-1], Stopped)
    assert 1 <= len(token_ids(events)) <= 16


@pytest.mark.parametrize("offset", OFFSETS)
def test_hit_from_a_snapshot_gives_the_cold_tokens(engine: Engine, offset: int) -> None:
    """Restoring ``offset`` tokens, or one fewer (a whole-prompt hit must recompute the last
    token for its logits, spec §2.5), computes only the rest and changes nothing."""
    tokens = random_prompt(N, seed=5)
    cold = solo(engine, EngineRequest(tokens, greedy(8), snapshot_at=(offset,)))
    payload = prefilled(cold).snapshots[offset]
    for reuse in (offset - 1, offset) if offset < N else (offset - 1,):
        warm = solo(engine, EngineRequest(tokens, greedy(8), payload, reuse))
        assert token_ids(warm) == token_ids(cold), f"restored {reuse} tokens"
        assert warm[-1] == cold[-1]
        assert prefilled(warm).num_computed_tokens == N - reuse


def test_payloads_outlive_their_producer(engine: Engine) -> None:
    """Snapshots stay valid after the sequence that made them was cancelled and other requests
    reused its working memory; restoring one twice gives the same answer."""
    tokens = long_reply_prompt(engine, N)
    reference = token_ids(solo(engine, EngineRequest(tokens, greedy(6))))
    run = Run(engine)
    producer = run.add(EngineRequest(tokens, greedy(40), snapshot_at=(OFFSETS[1], N)))
    while not any(isinstance(e, TokenOut) for e in run.events[producer]):
        run.step()
    run.cancel(producer)
    snapshots = prefilled(run.events[producer]).snapshots
    shapes = {x: (p.num_tokens, p.nbytes, list(p.parts)) for x, p in snapshots.items()}
    for seed in range(6, 9):  # overwrite whatever the producer freed
        solo(engine, EngineRequest(random_prompt(N, seed=seed), greedy(8)))
    for _ in range(2):
        for offset, reuse in ((OFFSETS[1], OFFSETS[1]), (N, N - 1)):
            payload = snapshots[offset]
            warm = solo(engine, EngineRequest(tokens, greedy(6), payload, reuse))
            assert token_ids(warm) == reference, f"restored {reuse} tokens"
    assert {x: (p.num_tokens, p.nbytes, list(p.parts)) for x, p in snapshots.items()} == shapes


def test_prefill_only_stops_at_the_last_snapshot(subject: Subject, engine: Engine) -> None:
    tokens = random_prompt(N, seed=10)
    first, last = OFFSETS[0], OFFSETS[1]
    before = subject.prefilled_tokens()
    events = solo(engine, EngineRequest(tokens, greedy(0), snapshot_at=(first, last)))
    assert events[-1] == Stopped("max_tokens") and isinstance(events[-2], Prefilled)
    assert prefilled(events).num_computed_tokens == last
    assert subject.prefilled_tokens() - before == last

    # From a restored prefix: only the tokens up to the last snapshot are computed.
    restored = prefilled(events).snapshots[first]
    more = solo(engine, EngineRequest(tokens, greedy(0), restored, first, snapshot_at=(N,)))
    assert prefilled(more).num_computed_tokens == N - first

    # Nothing to snapshot: nothing to compute.
    before = subject.prefilled_tokens()
    nothing = solo(engine, EngineRequest(tokens, greedy(0)))
    assert nothing == [Prefilled({}, 0), Stopped("max_tokens")]
    assert subject.prefilled_tokens() == before

    # The prefill-only snapshots serve hits like any other.
    cold = token_ids(solo(engine, EngineRequest(tokens, greedy(10))))
    for payload, reuse in (
        (prefilled(events).snapshots[last], last),
        (prefilled(more).snapshots[N], N - 1),
    ):
        assert token_ids(solo(engine, EngineRequest(tokens, greedy(10), payload, reuse))) == cold


# --- several sequences ---------------------------------------------------------------------------


def test_sequences_added_together_get_their_solo_tokens(engine: Engine) -> None:
    """Requests of every kind in one run, joining at once and ending at different steps."""
    base = random_prompt(N, seed=11)
    snapshot = prefilled(solo(engine, EngineRequest(base, greedy(0), snapshot_at=(OFFSETS[1],))))
    payload = snapshot.snapshots[OFFSETS[1]]
    requests = [EngineRequest(random_prompt(n, seed=n), greedy(3 + n % 7)) for n in (3, 9, 70, 130)]
    requests += [
        EngineRequest(base + random_prompt(9, seed=12), greedy(9), payload, OFFSETS[1]),
        EngineRequest(base, greedy(11), payload, OFFSETS[1] - 1, snapshot_at=(N,)),
        EngineRequest(base, greedy(0), payload, OFFSETS[1], snapshot_at=(N - 2, N)),
    ]
    alone = [solo(engine, r) for r in requests]
    run = Run(engine)
    seqs = [run.add(r) for r in requests]
    run.finish()
    for i, (seq, events) in enumerate(zip(seqs, alone, strict=True)):
        assert_same_outcome(run.events[seq], events, f"request {i}")


def test_cancel_mid_prefill(engine: Engine) -> None:
    """A sequence cancelled between prefill chunks produces nothing more; a sequence beside it
    is unaffected."""
    other = EngineRequest(random_prompt(20, seed=13), greedy(6))
    expected = solo(engine, other)
    run = Run(engine)
    victim = run.add(EngineRequest(random_prompt(N, seed=14), greedy(8), snapshot_at=(N,)))
    bystander = run.add(other)
    for _ in range(3):  # a short prompt beside a long one may take a step of its own first
        run.step()
        if run.events[victim]:
            break
    assert [type(e) for e in run.events[victim]] == [PrefillProgress], (
        "the engine under test must be set up to prefill N tokens in several steps"
    )
    running = engine.num_running
    run.cancel(victim)
    assert engine.num_running == running - 1
    run.finish()
    assert [type(e) for e in run.events[victim]] == [PrefillProgress]
    assert_same_outcome(run.events[bystander], expected)


def test_cancel_mid_decode(engine: Engine) -> None:
    tokens = long_reply_prompt(engine, 30)
    other = EngineRequest(random_prompt(N, seed=15), greedy(6))
    expected = solo(engine, other)
    run = Run(engine)
    victim = run.add(EngineRequest(tokens, greedy(4)))
    bystander = run.add(other)
    while len(token_ids(run.events[victim])) < 2:
        run.step()
    assert victim in run.running
    running = engine.num_running
    run.cancel(victim)
    assert engine.num_running == running - 1
    produced = len(run.events[victim])
    run.finish()
    assert len(run.events[victim]) == produced
    assert_same_outcome(run.events[bystander], expected)


# --- validation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForeignPayload:
    """A ``KVPayload`` no engine here produced."""

    num_tokens: int
    nbytes: int = 64
    parts: tuple[tuple[PartId, int], ...] = ((1, 64),)


def test_invalid_requests_raise_at_add(engine: Engine) -> None:
    tokens = random_prompt(N, seed=16)
    events = solo(engine, EngineRequest(tokens, greedy(0), snapshot_at=(OFFSETS[1], N)))
    snaps = prefilled(events).snapshots
    mid = OFFSETS[1]
    bad = {
        "snapshot at 0": EngineRequest(tokens, greedy(1), snapshot_at=(0,)),
        "snapshot past the prompt": EngineRequest(tokens, greedy(0), snapshot_at=(N + 1,)),
        "snapshot inside the restored prefix": EngineRequest(
            tokens, greedy(0), snaps[mid], mid, snapshot_at=(mid,)
        ),
        "reuse without a payload": EngineRequest(tokens, greedy(1), None, 10),
        "reuse beyond the payload": EngineRequest(tokens, greedy(1), snaps[mid], mid + 1),
        "reuse beyond the prompt": EngineRequest(tokens[:mid], greedy(0), snaps[N], N),
        "negative reuse": EngineRequest(tokens, greedy(1), snaps[mid], -1),
        "all restored, a token wanted": EngineRequest(tokens, greedy(1), snaps[N], N),
        "a payload of another engine": EngineRequest(tokens, greedy(1), ForeignPayload(mid), mid),
        "negative max_tokens": EngineRequest(tokens, Sampling(max_tokens=-1)),
    }
    accepted = []
    for name, request in bad.items():
        try:
            seq = engine.add(request)
        except ValueError:
            continue
        engine.cancel(seq)
        accepted.append(name)
    assert not accepted, f"add accepted: {accepted}"
    too_long = random_prompt(engine.info.max_context_tokens + 1, seed=17)
    with pytest.raises(PromptTooLong):
        engine.add(EngineRequest(too_long, greedy(1)))
    assert engine.num_running == 0
    assert engine.step() == []


# --- the codec -----------------------------------------------------------------------------------


def test_codec_round_trip_serves_the_cold_tokens(engine: Engine, tmp_path: Path) -> None:
    """Host and device copies and saved files of a snapshot restore exactly, also once the
    original is gone; a damaged file is ``CorruptPayload``."""
    codec = engine.kv_codec
    tokens = random_prompt(N, seed=18)
    mid = OFFSETS[1]
    cold = solo(engine, EngineRequest(tokens, greedy(6), snapshot_at=(mid, N)))
    snaps = dict(prefilled(cold).snapshots)
    expected = token_ids(cold)
    del cold
    reuses = {mid: mid, N: N - 1}

    def serves(payload: KVPayload, offset: int) -> None:
        assert payload.num_tokens == offset
        warm = solo(engine, EngineRequest(tokens, greedy(6), payload, reuses[offset]))
        assert token_ids(warm) == expected, f"restored {reuses[offset]} tokens"
        assert prefilled(warm).num_computed_tokens == N - reuses[offset]

    paths = {}
    for offset, payload in snaps.items():
        serves(codec.to_device(codec.to_host(payload)), offset)
        paths[offset] = tmp_path / f"{offset}{codec.suffix}"
        codec.save(payload, paths[offset], {"entry": f"e{offset}"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())
    del snaps, payload
    gc.collect()  # the engine can no longer share the live originals' memory

    for offset, path in paths.items():
        assert codec.read_metadata(path)["entry"] == f"e{offset}"
        serves(codec.load(path), offset)
        serves(codec.to_device(codec.load(path)), offset)

    damaged = tmp_path / f"damaged{codec.suffix}"
    damaged.write_bytes(paths[N].read_bytes()[:-7])
    with pytest.raises(CorruptPayload):
        codec.load(damaged)
