"""``EngineWorker``: runs engine generators off the event loop, one step at a time.

Every running request owns a generator from ``Engine.generate``. One worker thread advances
them in turn (a prefill, or one decode step each), so several streams make progress at once and
the event loop never blocks on the model. Each step's result is handed to the request's asyncio
queue with ``call_soon_threadsafe``. Cancelling a job closes its generator on the worker thread
before its next step, which is how a client disconnect stops generation.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field

from promptcache.engine.base import EngineEvent
from promptcache.errors import Overloaded

log = logging.getLogger(__name__)


class _End:
    """Marks the end of a job's events."""


_END = _End()


@dataclass(eq=False)
class Job:
    """One request's generator and the queue its events arrive on."""

    generator: Generator[EngineEvent, None, None]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[EngineEvent | BaseException | _End] = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    async def next(self) -> EngineEvent | None:
        """The next event, None at the end; re-raises what the engine raised."""
        item = await self.queue.get()
        if isinstance(item, _End):
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True

    def _push(self, item: EngineEvent | BaseException | _End) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True


class EngineWorker:
    """A thread that round-robins over running jobs. At most ``max_jobs`` at once."""

    def __init__(self, max_jobs: int = 64) -> None:
        self.max_jobs = max_jobs
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._num_active = 0

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
        """Jobs submitted and not yet finished (queued or being stepped)."""
        return self._num_active

    def submit(self, generator: Generator[EngineEvent, None, None]) -> Job:
        """Queue ``generator``; raises ``Overloaded`` when ``max_jobs`` are already running."""
        job = Job(generator, asyncio.get_running_loop())
        with self._cond:
            if self._num_active >= self.max_jobs:
                raise Overloaded("Overloaded")
            self._jobs.append(job)
            self._num_active += 1
            self._cond.notify()
        return job

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    jobs = list(self._jobs)
                    self._jobs.clear()
                    self._num_active = 0
                    for job in jobs:
                        job.generator.close()
                        job._push(_END)
                    return
                job = self._jobs.popleft()
            more = self._step(job)
            with self._cond:
                if more:
                    self._jobs.append(job)
                else:
                    self._num_active -= 1

    def _step(self, job: Job) -> bool:
        """Advance ``job`` once; True while it has more to do."""
        if job.cancelled:
            job.generator.close()
            job._push(_END)
            return False
        try:
            event = next(job.generator)
        except StopIteration:
            job._push(_END)
            return False
        except Exception as exc:  # reported to this request only
            log.exception("engine step failed")
            job._push(exc)
            return False
        job._push(event)
        return True


__all__ = ["EngineWorker", "Job"]
