"""The engine behind a server: a step loop runs apart from the callers; asyncio callers add requests and
stream their outputs.

The loop runs either in a thread of this process or, for serving (`separate_process=True`), in a child
process of its own. A server's event loop spends Python time on every message it streams (Ray Serve's
streaming, metrics, SSE); in a thread, that work and the step loop's host work share one GIL and slow
each other down, most under many streams. In its own process the loop steps at full speed and sends each
step's outputs as one message.

Only the loop touches the engine. Callers hand it commands (add, abort) and receive `RequestOutput`s on
per-request asyncio queues, so a slow or cancelled client never blocks a step, and an abort frees the
request's pages at the next step boundary. Each event loop gets one callback per step carrying all of
that step's outputs, and a caller that falls behind gets the outputs waiting for it merged into one
(tokens and text concatenated), so messages per second stay bounded by steps per second. Every few
milliseconds of stepping, and while idle, the loop publishes a snapshot (stats and routing state; the
cached-page hashes, thousands on a large pool, at most every `hashes_period_s`).

In its own process the loop never waits on its parent: a sender thread there pickles and sends what the
loop emits, everything that piled up since its last send as one message, so a parent that falls behind
(a busy event loop) gets fewer, larger messages instead of stalling the steps.

`n` > 1 samples of one prompt share its pages: the first sample is admitted alone and the others only
once its prompt is in the cache (after its first token), so they hit the prefix cache for every full
prompt page instead of each prefilling its own copy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import multiprocessing
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable

from zipserve.workers.config import EngineConfig
from zipserve.workers.engine import LLMEngine, check_request
from zipserve.workers.tensor_parallel import make_engine
from zipserve.workers.outputs import RequestOutput, SpanView
from zipserve.workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped (an exception in a step, a dead engine process, or shutdown)."""


class StepLoop:
    """The loop body, wherever it runs: take commands, step, emit outputs and snapshots.

    next_command(timeout) returns a command or None; emit(kind, *payload) hands results over:
    ("outputs", outputs, snapshot or None), ("idle", snapshot), ("reject", request_id, message)."""

    def __init__(self, engine: LLMEngine, next_command: Callable, emit: Callable, idle_wait_s: float,
                 snapshot_period_s: float, hashes_period_s: float = 0.1):
        self.engine, self.next_command, self.emit = engine, next_command, emit
        self.idle_wait_s, self.snapshot_period_s, self.hashes_period_s = idle_wait_s, snapshot_period_s, hashes_period_s
        self._hashes_at = float("-inf")

    def snapshot(self) -> dict:
        """Stats and routing state; the page hashes only when hashes_period_s has passed (a snapshot
        without "cached" in its routing state keeps the previous list: see merge_snapshot)."""
        eng, now = self.engine, time.monotonic()
        with_hashes = now - self._hashes_at >= self.hashes_period_s
        if with_hashes:
            self._hashes_at = now
        return {"stats": eng.stats(), "routing": eng.routing_state(with_hashes), "time": time.time()}

    def run(self) -> None:
        eng, last_snapshot = self.engine, 0.0
        while True:
            cmd = self.next_command(0 if eng.has_unfinished_requests() else self.idle_wait_s)
            while cmd is not None:
                if cmd[0] == "stop":
                    return
                self._apply(cmd)
                cmd = self.next_command(0)
            if not eng.has_unfinished_requests():
                self.emit("idle", self.snapshot())
                last_snapshot = time.monotonic()
                continue
            outputs = eng.step()
            snap = None
            # Also on a finish or a first token (pages returned / taken): those states ride on responses.
            if time.monotonic() - last_snapshot >= self.snapshot_period_s or any(
                    o.finished or (o.new_token_ids and len(o.new_token_ids) == len(o.token_ids)) for o in outputs):
                snap, last_snapshot = self.snapshot(), time.monotonic()
            self.emit("outputs", outputs, snap)

    def _apply(self, cmd) -> None:
        if cmd[0] == "add":
            _, rid, prompt_ids, params, resume = cmd
            try:
                self.engine.add_request(rid, prompt_ids, params, resume_token_ids=resume)
            except ValueError as e:  # validated before, so only a race (e.g. duplicate id) lands here
                self.emit("reject", rid, str(e))
        elif cmd[0] == "abort":
            self.engine.abort_request(cmd[1])
        else:
            raise ValueError(f"unknown engine command {cmd[0]!r}")


class AsyncEngine:
    def __init__(self, config: EngineConfig, idle_wait_s: float = 0.05, snapshot_period_s: float = 0.02,
                 separate_process: bool = False, start_timeout_s: float = 900.0):
        self.config = config
        self.separate_process = separate_process
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._outputs: dict[str, _StreamState] = {}  # process mode: what each request generated so far
        self.error: BaseException | None = None
        self.last_step_time = time.monotonic()
        if separate_process:
            self.engine = None
            ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or Ray threads
            self._conn, child_conn = ctx.Pipe()
            self._send_lock = threading.Lock()
            self._process = ctx.Process(target=_engine_process_main, name="zipserve-engine",
                                        args=(config, child_conn, idle_wait_s, snapshot_period_s), daemon=True)
            self._process.start()
            child_conn.close()
            if not self._conn.poll(start_timeout_s):
                self._process.kill()
                raise RuntimeError(f"the engine process did not start within {start_timeout_s:.0f} s")
            try:
                kind, *payload = self._conn.recv()
            except EOFError:
                raise RuntimeError(f"the engine process exited while starting (code {self._process.exitcode})") from None
            if kind == "failed":
                self._process.join(10)
                raise RuntimeError(f"the engine process failed to start: {payload[0]}")
            self.facts, self.snapshot = payload
            self._thread = threading.Thread(target=self._read_process, name="zipserve-engine-reader", daemon=True)
        else:
            self.engine = make_engine(config)
            self.facts = self.engine.facts()
            self._commands: queue.SimpleQueue = queue.SimpleQueue()
            self._loop = StepLoop(self.engine, self._next_command, self._on_result, idle_wait_s, snapshot_period_s)
            self.snapshot = self._loop.snapshot()
            self._thread = threading.Thread(target=self._run_thread, name="zipserve-engine-loop", daemon=True)
        self._thread.start()

    # ---- caller side (any thread / event loop) ----------------------------------------------
    @property
    def alive(self) -> bool:
        if self.error is not None or not self._thread.is_alive():
            return False
        return not self.separate_process or self._process.is_alive()

    @property
    def pid(self) -> int | None:
        """The engine process's id (separate_process), else None."""
        return self._process.pid if self.separate_process else None

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError for a request the engine would refuse (checked before anything is queued)."""
        check_request(prompt_ids, params, self.facts)

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
            if self.separate_process:
                self._outputs[rid] = _StreamState(prompt_ids, list(resume) if i == 0 else [],
                                                  [] if params.logprobs is not None else None)
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
                    if isinstance(out, ValueError):
                        raise out
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
                self._outputs.pop(rid, None)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def shutdown(self) -> None:
        self._send(("stop",))
        if self.separate_process:
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
        self._thread.join(timeout=10)

    def _send(self, command) -> None:
        if not self.separate_process:
            self._commands.put(command)
            return
        try:
            with self._send_lock:
                self._conn.send(command)
        except (OSError, ValueError):  # the process is gone: the reader thread reports it to every stream
            pass

    # ---- thread host ------------------------------------------------------------------------
    def _next_command(self, timeout: float):
        try:
            return self._commands.get(timeout=timeout) if timeout > 0 else self._commands.get_nowait()
        except queue.Empty:
            return None

    def _run_thread(self) -> None:
        try:
            self._loop.run()
        except BaseException as e:  # noqa: BLE001 -- every waiting request must hear of it
            log.exception("engine loop failed")
            self._fail(e)
        finally:
            _close(self.engine)

    # ---- process host: the parent's reader ---------------------------------------------------
    def _read_process(self) -> None:
        try:
            while True:
                kind, *payload = self._conn.recv()
                for kind, *payload in (payload[0] if kind == "batch" else [(kind, *payload)]):
                    if kind == "outputs":
                        self._on_result("outputs", [self._rebuild(o) for o in payload[0]], payload[1])
                    elif kind == "died":
                        log.error("engine process failed:\n%s", payload[1])
                        self._fail(RuntimeError(payload[0]))
                        return
                    else:
                        self._on_result(kind, *payload)
        except (EOFError, OSError):
            self._process.join(5)
            self._fail(RuntimeError(f"the engine process exited (code {self._process.exitcode})"))

    def _rebuild(self, o: tuple) -> RequestOutput:
        """A RequestOutput from the process's compact form (only what is new crosses the pipe; tokens, text
        and logprobs so far accumulate here)."""
        rid, new_ids, new_text, finished, reason, stop, cached, new_logprobs, final_text, prompt_logprobs = o
        st = self._outputs.get(rid) or _StreamState([], [], None)
        st.tokens.extend(new_ids)
        st.text = final_text if finished else st.text + new_text
        if st.logprobs is not None and new_logprobs:
            st.logprobs.extend(new_logprobs)
        logprobs = None if st.logprobs is None else list(st.logprobs) if finished else SpanView(st.logprobs, 0)
        return RequestOutput(rid, st.prompt, list(st.tokens) if finished else SpanView(st.tokens, 0), st.text,
                             finished, reason, stop, list(new_ids), new_text, cached, logprobs,
                             prompt_logprobs=prompt_logprobs)

    # ---- both hosts ---------------------------------------------------------------------------
    def _on_result(self, kind: str, *payload) -> None:
        self.last_step_time = time.monotonic()
        if kind == "outputs":
            outputs, snap = payload
            if snap is not None:  # before the outputs: whoever sees a request finish sees its stats
                self.snapshot = merge_snapshot(self.snapshot, snap)
            self._deliver_all(outputs)
        elif kind == "idle":
            self.snapshot = merge_snapshot(self.snapshot, payload[0])
        elif kind == "reject":
            self._deliver(payload[0], ValueError(payload[1]))

    def _fail(self, e: BaseException) -> None:
        self.error = e
        for rid in list(self._streams):
            self._deliver(rid, e)

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
                    self._send(("abort", out.request_id))

    def _deliver(self, rid: str, item) -> None:
        target = self._streams.get(rid)
        if target is None:
            return
        loop, out_q = target
        try:
            loop.call_soon_threadsafe(out_q.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone
            self._send(("abort", rid))


def _engine_process_main(config: EngineConfig, conn, idle_wait_s: float, snapshot_period_s: float) -> None:
    """The engine process: build the engine, then run the step loop; results go back one message per step.
    It exits when told to, when its parent goes away (the pipe closes), or on an error it reports first."""
    try:
        engine = make_engine(config)
    except BaseException as e:  # noqa: BLE001 -- the parent raises it
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    # The model, caches and compiled kernels live as long as the process: out of the collector's sight, a
    # full collection no longer walks them (a profiled H100 step loop showed a 3 ms pause in 1 step of 10).
    gc.collect()
    gc.freeze()

    def next_command(timeout: float):
        if not conn.poll(timeout):
            return None
        try:
            return conn.recv()
        except EOFError:
            return ("stop",)  # the parent is gone

    sender = _PipeSender(conn)

    def emit(kind: str, *payload) -> None:
        if kind == "outputs":
            outputs, snap = payload
            payload = ([_compact(o) for o in outputs], snap)
        sender.put((kind, *payload))

    loop = StepLoop(engine, next_command, emit, idle_wait_s, snapshot_period_s)
    conn.send(("ready", engine.facts(), loop.snapshot()))
    try:
        loop.run()
    except (BrokenPipeError, EOFError, ConnectionError):
        return  # the parent is gone
    except BaseException as e:  # noqa: BLE001 -- every waiting request must hear of it
        sender.put(("died", f"{type(e).__name__}: {e}", traceback.format_exc()))
    finally:
        sender.close()
        _close(engine)


class _PipeSender:
    """Sends the engine process's messages from a thread, so the step loop never blocks on the pipe:
    whatever piled up while the parent was slow goes as one ("batch", [messages]) message. After the pipe
    breaks, put() raises (the loop then ends: its parent is gone)."""

    def __init__(self, conn):
        self.conn, self.error = conn, None
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="zipserve-engine-sender", daemon=True)
        self.thread.start()

    def put(self, message: tuple) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(message)

    def close(self, timeout_s: float = 10.0) -> None:
        self.queue.put(None)
        self.thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            while True:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            last = batch[-1] is None
            batch = [m for m in batch if m is not None]
            try:
                if batch:
                    self.conn.send(("batch", batch))
            except (OSError, ValueError) as e:
                self.error = BrokenPipeError(f"the engine's parent is gone: {e!r}")
                return
            except Exception as e:  # noqa: BLE001 -- e.g. an unpicklable output: the loop must stop, not hang
                self.error = RuntimeError(f"the engine could not send its outputs: {e!r}")
                return
            if last:
                return


def merge_snapshot(old: dict | None, new: dict) -> dict:
    """`new`, with the previous page hashes when it carries none (StepLoop.snapshot sends them less often)."""
    if "cached" not in new["routing"] and old is not None and "cached" in old["routing"]:
        new = dict(new, routing=dict(new["routing"], cached=old["routing"]["cached"]))
    return new


def _close(engine) -> None:
    """Stop a tensor-parallel engine's other ranks (a plain engine has nothing to stop)."""
    shutdown = getattr(engine, "shutdown", None)
    if shutdown is not None:
        try:
            shutdown()
        except Exception:  # noqa: BLE001 -- closing; the ranks die with this process anyway
            log.exception("tensor-parallel shutdown failed")


@dataclasses.dataclass
class _StreamState:
    prompt: list[int]
    tokens: list[int]
    logprobs: list | None
    text: str = ""


def _compact(o: RequestOutput) -> tuple:
    k = len(o.new_token_ids)
    new_logprobs = list(o.logprobs[len(o.logprobs) - k:]) if o.logprobs is not None and k else None
    return (o.request_id, list(o.new_token_ids), o.new_text, o.finished, o.finish_reason, o.stop_reason,
            o.num_cached_tokens, new_logprobs, o.text if o.finished else None, o.prompt_logprobs)


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
