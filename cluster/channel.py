"""One multiplexed token stream per (worker replica, ingress replica) pair, instead of one Ray streaming
generator per request.

Every message of a Ray streaming generator costs both processes a serialization, an object transfer and a
wake-up; at 256 streams that per-request, per-step traffic, not the engine, set the served speed. So the
ingress opens one `subscribe` stream to each worker replica it uses, and the worker sends all of that
ingress's chunks of a flush interval as one message (chunks of one request merged). A request's own call
(`generate` with a `channel`) still goes through the router, carries the request's lifetime (cancelling it
aborts the request; a dead worker fails it, which starts the migration) and yields a single item at
admission naming the replica, so the ingress knows which stream to read.

    WorkerChannel   worker side: buffers chunks for one ingress and hands them over merged, per interval
    Subscriptions   ingress side: one reader per worker replica, dispatching chunks to per-request queues

The flush interval adapts to load (`flush_interval`): with few open streams every step's tokens go out at
once; with many, chunks are merged so that the ingress handles at most about `events_per_s` per-request
events a second.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time

log = logging.getLogger("zipserve.channel")


def flush_interval(open_streams: int, events_per_s: float, max_interval_s: float) -> float:
    """Seconds between two flushes of a channel with this many open streams (0: flush at once)."""
    if events_per_s <= 0:
        return max_interval_s
    return min(max_interval_s, open_streams / events_per_s)


def merge_chunks(chunks: list[dict]) -> list[dict]:
    """Chunks of one flush, one per (request, sample): tokens, text and logprobs concatenated in order, the other
    fields from the latest, a worker_state kept from the latest that has one."""
    merged: dict[tuple, dict] = {}
    for c in chunks:
        key = (c["rid"], c["index"])
        prev = merged.get(key)
        if prev is None:
            merged[key] = c
            continue
        state = c.get("worker_state") or prev.get("worker_state")
        merged[key] = dict(c, token_ids=prev["token_ids"] + c["token_ids"], text=prev["text"] + c["text"])
        if "logprobs" in c:
            merged[key]["logprobs"] = prev["logprobs"] + c["logprobs"]
        if "prompt_logprobs" in prev:  # (sent once, with the first token)
            merged[key]["prompt_logprobs"] = prev["prompt_logprobs"]
        if state is not None:
            merged[key]["worker_state"] = state
    return list(merged.values())


class WorkerChannel:
    """The chunks a worker replica owes one ingress replica."""

    def __init__(self):
        self.items: list[dict] = []
        self.ready = asyncio.Event()
        self.open_streams = 0  # requests of this ingress running here
        self.subscribed = False
        self.pending_since = 0.0  # when the oldest chunk not yet taken was put
        self._reader = None  # the serve() call that owns the stream now (a newer subscribe replaces it)

    def put(self, chunk: dict) -> None:
        if not self.items:
            self.pending_since = time.monotonic()
        self.items.append(chunk)
        self.ready.set()

    def drop(self, rid: str) -> None:
        """Forget the untaken chunks of a request that ended without its reader (cancelled, failed)."""
        self.items = [c for c in self.items if c["rid"] != rid]
        if not self.items:
            self.ready.clear()

    def take(self) -> list[dict]:
        items, self.items = self.items, []
        self.ready.clear()
        return merge_chunks(items)

    def orphaned_for(self) -> float:
        """Seconds the oldest untaken chunk has waited with no reader (its ingress gone, or not yet back)."""
        return 0.0 if self.subscribed or not self.items else time.monotonic() - self.pending_since

    async def serve(self, events_per_s: float, max_interval_s: float, idle_end_s: float):
        """The body of a `subscribe` call: an empty message first (the ingress then knows the stream is up),
        then merged chunks at most once per flush interval. Ends after idle_end_s with no open stream, so
        a replica that is drained is not held open by its subscribers (the ingress subscribes again)."""
        me = self._reader = object()
        self.subscribed = True
        try:
            yield []
            while self._reader is me:
                if not self.items:
                    try:
                        await asyncio.wait_for(self.ready.wait(), idle_end_s)
                    except TimeoutError:
                        if self.open_streams == 0 and not self.items:
                            return
                        continue
                if self._reader is not me:
                    return
                yield self.take()
                pause = flush_interval(self.open_streams, events_per_s, max_interval_s)
                if pause > 0:
                    await asyncio.sleep(pause)
        finally:
            if self._reader is me:
                self._reader = None
                self.subscribed = False


class WorkerLostError(RuntimeError):
    """The stream from a worker replica broke: its requests move elsewhere (cluster/ingress.py)."""


def _lost(replica: str, cause: BaseException) -> WorkerLostError:
    log.warning("stream from worker %s broke: %r", replica, cause)
    err = WorkerLostError(f"the stream from worker {replica} broke: {cause!r}")
    err.__cause__ = cause
    return err


class Subscriptions:
    """Ingress side: reads each worker replica's stream for this ingress and routes chunks by request id.

    open_stream(replica) -> an async iterator of message lists (the `subscribe` call, pinned to the replica).
    A request registers its queue before its call is sent, attaches to a replica once admitted, and gets
    every chunk for its id in order; if that replica's stream breaks, each request attached there gets a
    WorkerLostError on its queue."""

    def __init__(self, open_stream, connect_timeout_s: float = 30.0):
        self.open_stream = open_stream
        self.connect_timeout_s = connect_timeout_s
        self.queues: dict[str, asyncio.Queue] = {}
        self.replica_of: dict[str, str] = {}
        self.readers: dict[str, asyncio.Task] = {}

    def register(self, rid: str) -> asyncio.Queue:
        q = self.queues[rid] = asyncio.Queue()
        return q

    def release(self, rid: str) -> None:
        self.queues.pop(rid, None)
        self.replica_of.pop(rid, None)

    def attach(self, rid: str, replica: str) -> None:
        if rid not in self.queues:
            return
        self.replica_of[rid] = replica
        reader = self.readers.get(replica)
        if reader is None or reader.done():
            self._start_reader(replica)

    def _start_reader(self, replica: str) -> None:
        # In a fresh context: a task copies its creator's, here a request's (Ray Serve's request context), and
        # Serve cancels a cancelled request's calls -- this stream, which the other requests on it share.
        self.readers[replica] = asyncio.get_running_loop().create_task(self._read(replica),
                                                                       context=contextvars.Context())

    async def _read(self, replica: str) -> None:
        stream = self.open_stream(replica)
        try:
            it = stream.__aiter__()
            await asyncio.wait_for(it.__anext__(), self.connect_timeout_s)  # the empty hello
            async for batch in it:
                for chunk in batch:
                    q = self.queues.get(chunk["rid"])
                    if q is not None:
                        q.put_nowait(chunk)
        except asyncio.CancelledError as e:
            if asyncio.current_task().cancelling():  # close(): this reader is cancelled
                raise
            self._fail(replica, _lost(replica, e))  # the stream's call was cancelled under it
            return
        except BaseException as e:  # noqa: BLE001 -- every request on that replica must hear of it
            self._fail(replica, _lost(replica, e))
            return
        finally:
            cancel = getattr(stream, "cancel", None)
            if cancel is not None:
                cancel()
        # The worker ended the stream (idle): requests that attached since then need a new reader.
        if any(r == replica for r in self.replica_of.values()):
            self._start_reader(replica)

    def _fail(self, replica: str, error: BaseException) -> None:
        for rid, r in list(self.replica_of.items()):
            if r == replica and rid in self.queues:
                self.queues[rid].put_nowait(error)

    def close(self) -> None:
        for t in self.readers.values():
            t.cancel()
