"""The engine behind a server: one thread runs the step loop; asyncio callers add requests and stream
their outputs.

Only the loop thread touches the engine. Callers hand it commands (add, abort) through a queue and
receive `RequestOutput`s on per-request asyncio queues, so a slow or cancelled client never blocks a step,
and an abort frees the request's pages at the next step boundary. The thread hands each event loop one
callback per step carrying all of that step's outputs, and a caller that falls behind gets the outputs
waiting for it merged into one (tokens and text concatenated): under load, messages per second stay
bounded by steps per second rather than growing with tokens per second, so serialization and the GIL do
not starve the step loop. Every few milliseconds of stepping the thread publishes a snapshot (stats and
routing state) that any thread may read.

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
    def __init__(self, config: EngineConfig, idle_wait_s: float = 0.05, snapshot_period_s: float = 0.02):
        self.engine = LLMEngine(config)
        self.config = config
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._idle_wait_s = idle_wait_s
        self._snapshot_period_s = snapshot_period_s
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
                       n: int = 1, resume_token_ids: list[int] | None = None,
                       stream_interval_s: float = 0.0) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Stream (sample index, output) pairs until every sample has finished. Cancelling the
        iteration (client gone) aborts every unfinished sample. resume_token_ids (n = 1 only): output
        a dead worker already streamed (see LLMEngine.add_request). stream_interval_s: after the first
        output, outputs are gathered for this long and handed over merged (a server's message rate then
        stays near streams / interval however fast the engine steps); a finish is handed over at once."""
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
            last_yield = None
            while pending:
                items = [await out_q.get()]
                if stream_interval_s > 0 and last_yield is not None:
                    await _gather_until(out_q, items, last_yield + stream_interval_s)
                last_yield = loop.time()
                for out in _merge_waiting(items, out_q):
                    if isinstance(out, BaseException):
                        raise EngineDeadError(f"the engine loop failed: {out!r}") from out
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
                self.last_step_time = now = time.monotonic()
                self._deliver_all(outputs)
                if now - self.snapshot["monotonic"] >= self._snapshot_period_s:
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

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        """One callback per event loop for the whole step (not one per request)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's event loop is gone
                for _, out in items:
                    self._commands.put(("abort", out.request_id))

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
        return {"stats": eng.stats(), "routing": eng.routing_state(), "time": time.time(), "monotonic": time.monotonic()}


async def _gather_until(out_q: asyncio.Queue, items: list, deadline: float) -> None:
    """Move outputs from out_q to items until `deadline` (loop time), or a finish or an error arrives."""
    loop = asyncio.get_running_loop()
    while not any(isinstance(x, BaseException) or x.finished for x in items[-1:]):
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        try:
            items.append(await asyncio.wait_for(out_q.get(), remaining))
        except TimeoutError:
            return


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)


def _merge_waiting(items: list, out_q: asyncio.Queue) -> list:
    """`items` and every output already waiting in out_q, one per request (n > 1 samples share the queue):
    new tokens and new text concatenated, the rest from the latest output. An error ends the list."""
    while not out_q.empty():
        items.append(out_q.get_nowait())
    merged: dict[str, RequestOutput] = {}
    for item in items:
        if isinstance(item, BaseException):
            return [*merged.values(), item]
        prev = merged.get(item.request_id)
        merged[item.request_id] = item if prev is None else dataclasses.replace(
            item, new_token_ids=list(prev.new_token_ids) + list(item.new_token_ids), new_text=prev.new_text + item.new_text)
    return list(merged.values())


def _sample_params(params: SamplingParams, i: int, n: int) -> SamplingParams:
    """Sample i of n: a seeded request gives each sample its own stream (seed + i)."""
    if n == 1 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=params.seed + i)
