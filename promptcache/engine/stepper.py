"""``GeneratorEngine``: the batched ``Engine`` protocol for engines written as one generator per
request (the fake engine, test doubles). ``step`` advances every running generator once, in the
order they were added, which is how such an engine interleaves its streams."""

from __future__ import annotations

from collections.abc import Generator

from promptcache.engine.base import EngineEvent, EngineRequest, SeqId, StepResult, Stopped


class GeneratorEngine:
    """Subclasses implement ``generate``; this class runs the generators as sequences."""

    def __init__(self) -> None:
        self._running: dict[SeqId, Generator[EngineEvent, None, None]] = {}
        self._last_seq: SeqId = 0

    def generate(self, request: EngineRequest) -> Generator[EngineEvent, None, None]:
        """The events of one request, ending with ``Stopped``."""
        raise NotImplementedError

    @property
    def num_running(self) -> int:
        return len(self._running)

    def add(self, request: EngineRequest) -> SeqId:
        self._last_seq += 1
        self._running[self._last_seq] = self.generate(request)
        return self._last_seq

    def cancel(self, seq: SeqId) -> None:
        generator = self._running.pop(seq, None)
        if generator is not None:
            generator.close()

    def step(self) -> StepResult:
        out: StepResult = []
        for seq, generator in list(self._running.items()):
            try:
                event = next(generator)
            except StopIteration:
                del self._running[seq]
                out.append((seq, RuntimeError("engine sequence ended without Stopped")))
                continue
            except Exception as exc:  # this sequence's failure only
                del self._running[seq]
                out.append((seq, exc))
                continue
            out.append((seq, event))
            if isinstance(event, Stopped):
                self.cancel(seq)
        return out


__all__ = ["GeneratorEngine"]
