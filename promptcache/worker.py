"""``EngineWorker``: the engine loop, off the event loop.

One thread owns the engine. Between steps it admits newly submitted requests (``Engine.add``)
and drops cancelled ones (``Engine.cancel``); each step advances every running sequence at once
(one batched forward on a real engine) and hands the step's events to their requests' asyncio
queues with one ``call_soon_threadsafe`` per event loop. A client disconnect cancels its job,
which frees the sequence's working state before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

from promptcache.engine import threads
from promptcache.engine.base import Engine, EngineEvent, EngineRequest, SeqId, Stopped
from promptcache.errors import Overloaded

log = logging.getLogger(__name__)


class _End:
    """Marks the end of a job's events."""


_END = _End()

_Item = EngineEvent | BaseException | _End
"""What a job's queue carries."""


@dataclass(eq=False)
class Job:
    """One request: what the engine runs and the queue its events arrive on."""

    engine: Engine
    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    worker: EngineWorker
    queue: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    seq: SeqId | None = None

    async def next(self) -> EngineEvent | None:
        """The next event, None at the end; re-raises what the engine raised."""
        item = await self.queue.get()
        if isinstance(item, _End):
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        """Stop this job; its sequence is freed before the engine's next step."""
        if not self.cancelled:
            self.cancelled = True
            self.worker._wake()

    def _push(self, item: _Item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True


class EngineWorker:
    """The thread that drives the engine. At most ``max_jobs`` requests at once."""

    def __init__(self, max_jobs: int = 64) -> None:
        self.max_jobs = max_jobs
        self._pending: deque[Job] = deque()
        self._running: dict[SeqId, Job] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._num_active = 0
        self._engine: Engine | None = None

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="promptcache-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def num_jobs(self) -> int:
        """Jobs submitted and not yet finished (queued or running)."""
        return self._num_active

    def submit(self, engine: Engine, request: EngineRequest) -> Job:
        """Queue ``request`` for ``engine``; raises ``Overloaded`` when ``max_jobs`` are already
        running."""
        job = Job(engine, request, asyncio.get_running_loop(), self)
        with self._cond:
            if self._num_active >= self.max_jobs:
                raise Overloaded("Overloaded")
            self._pending.append(job)
            self._num_active += 1
            self._cond.notify()
        return job

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _run(self) -> None:
        claimed = False
        while True:
            with self._cond:
                while not self._stopping and not self._running and not self._pending:
                    self._cond.wait()
                if self._stopping:
                    self._shutdown()
                    return
                admitted = list(self._pending)
                self._pending.clear()
            for job in admitted:
                self._admit(job)
            self._reap()
            if self._running:
                # This thread runs the engine's kernels, on every core (engine/threads.py);
                # torch is imported by the engine's load, which may come after this loop starts.
                claimed = claimed or threads.claim()
                self._step()

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            self._finish(job, _END)
            return
        if self._engine is not job.engine and self._running:
            # One engine at a time: a new engine (tests swap them) waits for the old one's work.
            with self._cond:
                self._pending.append(job)
            return
        self._engine = job.engine
        try:
            job.seq = job.engine.add(job.request)
        except Exception as exc:  # an invalid request: reported to it alone
            self._finish(job, exc)
            return
        self._running[job.seq] = job

    def _reap(self) -> None:
        """Free the sequences of cancelled jobs."""
        for seq, job in list(self._running.items()):
            if job.cancelled:
                del self._running[seq]
                job.engine.cancel(seq)
                self._finish(job, _END)

    def _step(self) -> None:
        engine = self._engine
        assert engine is not None
        try:
            results = engine.step()
        except Exception as exc:  # the step itself failed: every sequence in it fails
            log.exception("engine step failed")
            for seq, failed in list(self._running.items()):
                del self._running[seq]
                engine.cancel(seq)
                self._finish(failed, exc)
            return
        batch: list[tuple[Job, _Item]] = []
        for seq, item in results:
            job = self._running.get(seq)
            if job is None:
                continue
            if isinstance(item, Exception):
                log.error("engine sequence failed: %r", item)
                del self._running[seq]
                self._finish(job, item, batch)
                continue
            batch.append((job, item))
            if isinstance(item, Stopped):
                del self._running[seq]
                self._finish(job, _END, batch)
        _send(batch)

    def _finish(
        self, job: Job, item: BaseException | _End, batch: list[tuple[Job, _Item]] | None = None
    ) -> None:
        """``item`` (the end, or what failed the job) to ``job``: in ``batch`` when given (sent
        after the step's other events, in order), else now."""
        if batch is None:
            job._push(item)
        else:
            batch.append((job, item))
        with self._cond:
            self._num_active -= 1

    def _shutdown(self) -> None:
        jobs = list(self._running.items())
        self._running.clear()
        for seq, job in jobs:
            job.engine.cancel(seq)
            job._push(_END)
        for job in self._pending:
            job._push(_END)
        self._pending.clear()
        self._num_active = 0


def _send(batch: list[tuple[Job, _Item]]) -> None:
    """A step's events to their queues in one wake-up of each event loop (not one a token:
    eight streams woke the loop, and took the GIL from this thread, eight times a step)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, _Item]]] = {}
    for job, item in batch:
        by_loop.setdefault(job.loop, []).append((job, item))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            for job, _ in items:
                job.cancelled = True


def _deliver(items: list[tuple[Job, _Item]]) -> None:
    for job, item in items:
        job.queue.put_nowait(item)


__all__ = ["EngineWorker", "Job"]
