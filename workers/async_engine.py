"""The engine behind a server: one thread runs the step loop; asyncio callers add requests and stream
their outputs.

Only the loop thread touches the engine. Callers hand it commands (add, abort) through a queue and
receive `RequestOutput`s on per-request asyncio queues (`call_soon_threadsafe`), so a slow or cancelled
client never blocks a step, and an abort frees the request's pages at the next step boundary. After every
step the thread publishes a snapshot (stats and routing state) that any thread may read.

`n` > 1 samples of one prompt share its pages: the first sample is admitted alone and the others only
once its prompt is in the cache (after its first token), so they hit the prefix cache for every full
prompt page instead of each prefilling its own copy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from workers.config import EngineConfig
from workers.engine import LLMEngine
from workers.outputs import RequestOutput
from workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped (an exception in a step, or shutdown); requests cannot be served."""


class AsyncEngine:
    def __init__(self, config: EngineConfig, idle_wait_s: float = 0.05):
        self.engine = LLMEngine(config)
        self.config = config
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._idle_wait_s = idle_wait_s
        self._stop = False
        self.error: BaseException | None = None
        self.last_step_time = time.monotonic()
        self.snapshot: dict = self._snapshot()
        self._thread = threading.Thread(target=self._run, name="zipserve-engine-loop", daemon=True)
        self._thread.start()

    # ---- caller side (any thread / event loop) ----------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError for a request the engine would refuse (checked before anything is queued)."""
        self.engine.validate_request(prompt_ids, params)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       n: int = 1, resume_token_ids: list[int] | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Stream (sample index, output) pairs until every sample has finished. Cancelling the
        iteration (client gone) aborts every unfinished sample. resume_token_ids (n = 1 only): output
        a dead worker already streamed (see LLMEngine.add_request)."""
        if not self.alive:
            raise EngineDeadError(f"the engine loop is not running: {self.error!r}")
        resume = list(resume_token_ids or [])
        if resume and n != 1:
            raise ValueError("a resumed request carries one sample")
        self.validate(prompt_ids + resume, params)
        loop = asyncio.get_running_loop()
        out_q: asyncio.Queue = asyncio.Queue()
        ids = [request_id if n == 1 else f"{request_id}-{i}" for i in range(n)]
        for i, rid in enumerate(ids):
            self._streams[rid] = (loop, out_q)
        pending = set(ids)
        admitted = 1
        self._send(("add", ids[0], prompt_ids, _sample_params(params, 0, n), resume))
        try:
            while pending:
                item = await out_q.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine loop failed: {item!r}") from item
                out: RequestOutput = item
                if admitted < n:  # the first sample's prompt pages are cached now: admit the others
                    for i in range(admitted, n):
                        self._send(("add", ids[i], prompt_ids, _sample_params(params, i, n), None))
                    admitted = n
                if out.finished:
                    pending.discard(out.request_id)
                yield ids.index(out.request_id), out
        finally:
            for rid in ids[:admitted]:
                if rid in pending:
                    self._send(("abort", rid))
            for rid in ids:
                self._streams.pop(rid, None)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _send(self, command) -> None:
        self._commands.put(command)
        self._wake.set()

    # ---- loop thread -----------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        try:
            while not self._stop:
                self._drain_commands()
                if not eng.has_unfinished_requests():
                    self.snapshot = self._snapshot()
                    self._wake.wait(self._idle_wait_s)
                    self._wake.clear()
                    self.last_step_time = time.monotonic()
                    continue
                outputs = eng.step()
                self.last_step_time = time.monotonic()
                for out in outputs:
                    self._deliver(out.request_id, out)
                self.snapshot = self._snapshot()
        except BaseException as e:  # noqa: BLE001 -- every waiting request must hear of it
            log.exception("engine loop failed")
            self.error = e
            for rid in list(self._streams):
                self._deliver(rid, e)

    def _drain_commands(self) -> None:
        eng = self.engine
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, prompt_ids, params, resume = cmd
                try:
                    eng.add_request(rid, prompt_ids, params, resume_token_ids=resume)
                except ValueError as e:  # validated before, so only a race (e.g. duplicate id) lands here
                    self._deliver(rid, e)
            elif cmd[0] == "abort":
                eng.abort_request(cmd[1])

    def _deliver(self, rid: str, item) -> None:
        target = self._streams.get(rid)
        if target is None:
            return
        loop, out_q = target
        try:
            loop.call_soon_threadsafe(out_q.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone
            self._commands.put(("abort", rid))

    def _snapshot(self) -> dict:
        eng = self.engine
        return {"stats": eng.stats(), "routing": eng.routing_state(), "time": time.time()}


def _sample_params(params: SamplingParams, i: int, n: int) -> SamplingParams:
    """Sample i of n: a seeded request gives each sample its own stream (seed + i)."""
    if n == 1 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=params.seed + i)
