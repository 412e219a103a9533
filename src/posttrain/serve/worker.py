"""The one thread that owns the engine: HTTP handlers hand it requests, it hands back outputs.

The engine (and the model, the KV cache, the adapter bank) is touched only by this thread, so no
lock guards any tensor. The thread also builds it (loads the model, fuses the weights, reads the
adapters): `EngineWorker.start` says why that matters to speed. Handlers talk to it through a
thread-safe inbox; each request's outputs go to that request's asyncio queue via
`loop.call_soon_threadsafe`. Torch ops release the GIL, so
the event loop keeps serving HTTP while a step runs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from posttrain.inference.engine import Engine, Output, Request

log = logging.getLogger(__name__)


@dataclass
class _Submission:
    request: Request
    sink: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    tag: object  # handed back with every output (e.g. the choice index)


class EngineFailed(Exception):
    """The engine raised while this request was in flight (a bug, not bad input): HTTP 500."""


class EngineWorker:
    def __init__(self, build: Callable[[], Engine], idle_wait_s: float = 0.05):
        self._build = build
        self.engine: Engine | None = None  # set by start()
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self.idle_wait_s = idle_wait_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sinks: dict[str, _Submission] = {}
        self._thread = threading.Thread(target=self._run, name="posttrain-engine", daemon=True)
        self.steps = 0

    def start(self) -> Engine:
        """Start the thread, which builds the engine before serving; returns it once built, or raises what
        building raised (the thread has then ended).

        Why the engine is built on its own thread: every Python thread that runs a parallel torch op gets an
        OpenMP team of its own (libgomp), and once the teams' threads outnumber the CPUs, libgomp stops letting
        any team's workers spin between parallel regions: they sleep after each one and are woken for the next.
        A decode step is hundreds of small ops, so a model loaded on the main thread and stepped here paid 80-160
        thread sleeps per step and decoded about 2x slower than the same engine on the main thread (2 cores, when
        the machine was quiet). Built here, the engine's team is the only one, as in a single-threaded program."""
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error
        assert self.engine is not None
        return self.engine

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request: Request, sink: asyncio.Queue, tag: object = None) -> None:
        """Queue a request already checked with `engine.check`; its outputs arrive on `sink` as (tag, Output)."""
        self._inbox.put(("add", _Submission(request, sink, asyncio.get_running_loop(), tag)))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def load(self) -> dict[str, int]:
        """Counts for /metrics (read without a lock: a slightly stale number is fine)."""
        return {"running": len(self.engine.running), "waiting": len(self.engine.waiting)}

    def _deliver(self, sub: _Submission, item) -> None:
        try:
            sub.loop.call_soon_threadsafe(sub.sink.put_nowait, (sub.tag, item))
        except RuntimeError:  # the handler's loop is gone (server shutting down)
            pass

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.add(item.request)
                except Exception as err:  # checked by the handler already; a late failure still reaches it
                    self._deliver(item, err)
                    continue
                self._sinks[item.request.request_id] = item
            else:
                self.engine.abort(item)

    def _run(self) -> None:
        try:
            self.engine = self._build()
        except BaseException as err:  # the caller of start() raises it
            self._build_error = err
            return
        finally:
            self._built.set()
        self._serve()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain_inbox()
                if not self.engine.has_work():
                    self._wake.wait(self.idle_wait_s)
                    self._wake.clear()
                    continue
                outputs: list[Output] = self.engine.step()
                self.steps += 1
            except Exception as err:  # keep serving; every in-flight request learns it failed
                log.exception("engine step failed")
                self.engine.abort_all()
                # Every submission this thread holds, not only the ids the engine still lists: a request caught
                # between `waiting` and `running` when the step raised would otherwise wait forever.
                failed, self._sinks = self._sinks, {}
                for sub in failed.values():
                    self._deliver(sub, EngineFailed(f"the engine failed: {type(err).__name__}: {err}"))
                continue
            for out in outputs:
                sub = self._sinks.get(out.request_id)
                if sub is None:
                    continue
                if out.finished:
                    del self._sinks[out.request_id]
                self._deliver(sub, out)
