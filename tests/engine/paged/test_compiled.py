"""The compiled decode step (``paged.compiled``): the same hidden states and tokens as the eager
model, hits still exact, no compilation on the engine's thread, and ``--compile``'s choices.

One tiny sliding-window Gemma 3 engine is compiled for the module (Inductor builds C++: tens of
seconds); the tests skip where no C++ compiler is installed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from promptcache.core.request import Sampling
from promptcache.engine import threads
from promptcache.engine.base import EngineRequest
from promptcache.engine.hf.testing import (
    build_tiny_engine,
    random_prompt,
    run_all,
    token_ids,
)
from promptcache.engine.paged.attention import StepSeq
from promptcache.engine.paged.compiled import CompiledDecode, compiler_available
from promptcache.engine.paged.engine import PagedEngine
from tests.engine.paged.test_int8 import assert_hits_exact
from tests.engine.test_contract import Run

needs_compiler = pytest.mark.skipif(not compiler_available(), reason="no C++ compiler (g++)")


@pytest.fixture(autouse=True)
def engine_thread() -> None:
    """The test's thread computes with the default team, as the engine's thread does (the
    graph is guarded on the thread count; other tests change this thread's)."""
    threads.claim()


@pytest.fixture(scope="module")
def compiled_engine() -> Iterator[PagedEngine]:
    if not compiler_available():
        pytest.skip("no C++ compiler (g++)")
    engine = build_tiny_engine("gemma3", decode_int8=True, compile_decode=True)
    # The compiled graphs are what these tests exercise: narrow decode steps would otherwise
    # run in the engine's own kernels (``NativeDecode``), which take them first.
    engine.native_decode = None
    assert engine.compiled is not None
    assert engine.compiled.done.wait(timeout=900), "compilation did not finish"
    assert engine.compiled.failed is None
    yield engine


def eager_twin() -> PagedEngine:
    engine = build_tiny_engine("gemma3", decode_int8=True)
    engine.native_decode = None  # the PyTorch model, as the compiled graphs trace it
    return engine


@needs_compiler
@pytest.mark.parametrize("rows", [1, 3, 4, 6])
def test_a_decode_step_computes_what_the_eager_model_does(
    compiled_engine: PagedEngine, rows: int
) -> None:
    """The same planned step through the compiled graph and through the eager model (float32):
    the same hidden states, for one row (its own graph), a few (int8 weights) and more (dense
    weights)."""
    fast, slow = one_step(compiled_engine, rows)
    assert fast is not None
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def one_step(engine: PagedEngine, rows: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A decode step of ``rows`` sequences planned once, run compiled and then eagerly."""
    compiled = engine.compiled
    assert compiled is not None
    attn, pool, model = engine._attn, engine._pool, engine._model
    blocks = pool.allocate(12 * rows)
    seqs = [StepSeq(blocks[12 * i : 12 * i + 12], 30 + 7 * i, 1) for i in range(rows)]
    try:
        with torch.inference_mode():
            attn.plan(seqs, [])
            ids = torch.tensor(random_prompt(rows, seed=rows))
            positions = torch.tensor([s.start for s in seqs])
            engine._decode_switch.set_step(rows, 0)  # type: ignore[union-attr]
            fast = compiled(ids, positions, attn)
            slow = model(ids, positions, attn)
    finally:
        pool.decref(blocks)
    return fast, slow


@needs_compiler
def test_a_step_it_was_not_compiled_for_runs_eagerly(compiled_engine: PagedEngine) -> None:
    """A thread with another PyTorch thread count (the graphs are guarded on it): the step
    falls back to the eager model at once, it never compiles on the engine's thread."""
    compiled = compiled_engine.compiled
    assert compiled is not None
    if threads.default_threads() == 1:
        pytest.skip("one core: no other thread count to try")
    before = compiled.num_fallbacks
    torch.set_num_threads(1)
    try:
        fast, _ = one_step(compiled_engine, 1)
    finally:
        threads.claim()
    assert fast is None
    assert compiled.num_fallbacks == before + 1
    assert compiled.ready.is_set()  # one refusal does not give up on it
    fast, _ = one_step(compiled_engine, 1)
    assert fast is not None


@needs_compiler
def test_streams_decode_the_eager_engines_tokens(compiled_engine: PagedEngine) -> None:
    """Six streams (the dense weights' graph while all decode), then one alone: every decode
    step runs compiled, none needs another compilation, and the tokens are the eager engine's."""
    compiled = compiled_engine.compiled
    assert compiled is not None
    before, fallbacks = compiled.num_steps, compiled.num_fallbacks
    greedy = Sampling(max_tokens=12, temperature=0.0)
    # The last one is long enough that its window layers and full layers read different widths.
    requests = [EngineRequest(random_prompt(n, seed=n), greedy) for n in (20, 29, 33, 40, 51, 110)]
    fast, slow = Run(compiled_engine), Run(eager_twin())
    for run in (fast, slow):
        for request in requests:
            run.add(request)
        run.finish()
    assert [token_ids(e) for e in fast.events.values()] == [
        token_ids(e) for e in slow.events.values()
    ]
    assert compiled.num_steps - before >= 11
    assert compiled.num_fallbacks == fallbacks
    alone = run_all(compiled_engine, requests[0])
    assert token_ids(alone) == token_ids(next(iter(fast.events.values())))


@needs_compiler
def test_hits_stay_exact(compiled_engine: PagedEngine) -> None:
    assert_hits_exact(compiled_engine)


@needs_compiler
def test_a_float16_pool_compiles_and_keeps_hits_exact() -> None:
    """The graphs over a float16 pool under the float32 model (the CPU default): the custom
    attention operator stores the keys rounded and reads them converted, as the eager path."""
    engine = build_tiny_engine(
        "gemma3", decode_int8=True, compile_decode=True, kv_dtype=torch.float16
    )
    engine.native_decode = None
    assert engine.compiled is not None
    assert engine.compiled.done.wait(timeout=900), "compilation did not finish"
    assert engine.compiled.failed is None
    for rows in (1, 3):
        fast, slow = one_step(engine, rows)
        assert fast is not None
        torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    assert_hits_exact(engine)


def test_prompt_tokens_run_eagerly() -> None:
    engine = build_tiny_engine("gemma3", decode_int8=True)
    compiled = CompiledDecode(engine._model, narrow_rows=4)
    assert not compiled.covers(1, 0)  # not ready yet
    compiled.ready.set()
    assert compiled.covers(1, 0) and compiled.covers(4, 0) and compiled.covers(9, 0)
    assert not compiled.covers(1, 3) and not compiled.covers(0, 8)


def test_compile_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    from promptcache.engine.hf.loader import AUTO_COMPILE_MIN_CORES, resolve_compile

    model = build_tiny_engine("gemma3")._model
    assert resolve_compile("off", model, int8=True) is False
    assert resolve_compile("auto", model, int8=False) is False
    for cores in (AUTO_COMPILE_MIN_CORES - 2, AUTO_COMPILE_MIN_CORES):
        monkeypatch.setattr("os.cpu_count", lambda n=cores: n)
        expected = compiler_available() and cores >= AUTO_COMPILE_MIN_CORES
        assert resolve_compile("auto", model, int8=True) is expected
        # "on" compiles whatever the cores (where a compiler is).
        assert resolve_compile("on", model, int8=True) is True or not compiler_available()
    # Where the engine's own kernels decode, auto leaves compiling to "on".
    assert resolve_compile("auto", model, int8=True, native=True) is False
    if compiler_available():
        assert resolve_compile("on", model, int8=True, native=True) is True
    with pytest.raises(ValueError, match="no int8 decode weights"):
        resolve_compile("on", model, int8=False)
    with pytest.raises(ValueError, match="unknown compile mode"):
        resolve_compile("sometimes", model, int8=True)


def test_graphs_compile_only_while_the_engine_is_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compile thread waits for ``idle`` before each graph (tracing beside a running step
    slowed the step tenfold); the engine is idle only with nothing running and no step for
    ``IDLE_BEFORE_COMPILE_S``."""
    from promptcache.engine.paged import compiled as compiled_module
    from promptcache.engine.paged import engine as engine_module

    engine = build_tiny_engine("gemma3", decode_int8=True)
    assert engine._idle()  # never stepped
    engine.add(EngineRequest(random_prompt(8), Sampling(max_tokens=2, temperature=0.0)))
    assert not engine._idle()  # a request is running
    while engine.num_running:
        engine.step()
    assert not engine._idle()  # it just stepped
    monkeypatch.setattr(engine_module, "IDLE_BEFORE_COMPILE_S", 0.0)
    assert engine._idle()

    class Busy(Exception):
        pass

    calls = 0

    def idle() -> bool:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise Busy  # stop here: nothing was compiled while it said no
        return False

    monkeypatch.setattr(compiled_module, "IDLE_POLL_S", 0.0)
    compiled = CompiledDecode(engine._model, 4)
    with pytest.raises(Busy):
        compiled.warm(engine._pool.kv, idle)
    assert calls == 3 and not compiled.ready.is_set()


def test_a_failed_compilation_ends_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compilation that fails leaves the engine eager and says why, and ``done`` is set so
    whoever waits for it stops waiting (a failure once left ``ready`` unset and the waiter
    hanging for its whole timeout)."""
    engine = build_tiny_engine("gemma3", decode_int8=True)
    compiled = CompiledDecode(engine._model, 4)

    def warm(*args: object) -> None:
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(compiled, "warm", warm)
    compiled.start(engine._pool.kv).join(timeout=60)
    assert compiled.done.is_set() and not compiled.ready.is_set()
    assert compiled.failed == "RuntimeError: no compiler today"
