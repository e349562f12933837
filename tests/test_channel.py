"""The multiplexed worker -> ingress stream (cluster/channel.py) without Ray: merging keeps each request's
tokens in order, a flush carries every request that has output (none starved), the flush interval follows
the load, a newer subscriber takes over, an idle stream ends, and a broken stream fails exactly the requests
attached to that worker."""

import asyncio
import random

import pytest

from tests.waiting import wait_until_async
from zipserve.cluster.channel import Subscriptions, WorkerChannel, WorkerLostError, flush_interval, merge_chunks


def _chunk(rid, index, toks, finish=None, **kw):
    return {"rid": rid, "index": index, "token_ids": list(toks), "text": "".join(f"<{t}>" for t in toks),
            "finish_reason": finish, "completion_tokens": None, **kw}


def test_merge_keeps_each_requests_order_and_the_latest_fields():
    rng = random.Random(0)
    chunks, want = [], {}
    for step in range(50):  # 12 requests x 2 samples, interleaved at random, as steps would produce them
        for rid in rng.sample(range(12), 7):
            for index in (0, 1):
                tok = step * 100 + rid
                chunks.append(_chunk(f"r{rid}", index, [tok], completion_tokens=step))
                want.setdefault((f"r{rid}", index), []).append(tok)
    merged = merge_chunks(chunks)
    assert len(merged) == len(want)  # one per (request, sample)
    for m in merged:
        toks = want[(m["rid"], m["index"])]
        assert m["token_ids"] == toks and m["text"] == "".join(f"<{t}>" for t in toks)
    last = merge_chunks([_chunk("a", 0, [1], worker_state={"n": 1}), _chunk("a", 0, [2]),
                         _chunk("a", 0, [3], finish="stop")])[0]
    assert last["finish_reason"] == "stop" and last["worker_state"] == {"n": 1} and last["token_ids"] == [1, 2, 3]
    newer = merge_chunks([_chunk("a", 0, [1], worker_state={"n": 1}), _chunk("a", 0, [2], worker_state={"n": 2})])[0]
    assert newer["worker_state"] == {"n": 2}


def test_flush_interval_follows_the_load():
    assert flush_interval(0, 4000, 0.2) == 0
    assert flush_interval(8, 4000, 0.2) == pytest.approx(0.002)   # light load: about every step
    assert flush_interval(256, 4000, 0.2) == pytest.approx(0.064)
    assert flush_interval(10_000, 4000, 0.2) == 0.2               # capped
    assert flush_interval(5, 0, 0.2) == 0.2


def test_channel_serves_a_hello_then_merged_flushes_with_every_request():
    async def main():
        ch = WorkerChannel()
        ch.open_streams = 40
        stream = ch.serve(events_per_s=40 / 0.05, max_interval_s=0.05, idle_end_s=5)
        assert await stream.__anext__() == []  # the hello: the ingress knows the stream is up
        for step in range(5):
            for rid in range(40):
                ch.put(_chunk(f"r{rid}", 0, [step]))
        batch = await stream.__anext__()
        assert sorted(c["rid"] for c in batch) == sorted(f"r{i}" for i in range(40))
        assert all(c["token_ids"] == [0, 1, 2, 3, 4] for c in batch)
        loop = asyncio.get_running_loop()
        t = loop.time()
        ch.put(_chunk("r0", 0, [9]))
        assert (await stream.__anext__())[0]["token_ids"] == [9]
        assert loop.time() - t >= 0.045  # the next flush waited out the interval (40 streams / 800 per s)
        await stream.aclose()

    asyncio.run(main())


def test_a_newer_subscriber_takes_over_and_an_idle_stream_ends():
    async def main():
        ch = WorkerChannel()
        old = ch.serve(4000, 0.01, idle_end_s=0.05)
        assert await old.__anext__() == []
        new = ch.serve(4000, 0.01, idle_end_s=0.05)
        assert await new.__anext__() == []
        ch.put(_chunk("a", 0, [1]))
        assert (await new.__anext__())[0]["token_ids"] == [1]
        with pytest.raises(StopAsyncIteration):  # the old one leaves the chunks to the new one
            await asyncio.wait_for(old.__anext__(), 5)
        with pytest.raises(StopAsyncIteration):  # nothing open, nothing buffered: the stream ends
            await asyncio.wait_for(new.__anext__(), 5)
        assert not ch.subscribed
        assert ch.orphaned_for() == 0.0
        ch.put(_chunk("b", 0, [2]))
        await asyncio.sleep(0.02)
        assert ch.orphaned_for() >= 0.015  # buffered with no reader

    asyncio.run(main())


class _FakeWorker:
    """Streams per replica that a test feeds by hand."""

    def __init__(self):
        self.queues: dict[str, asyncio.Queue] = {}
        self.opened: list[str] = []

    def open_stream(self, replica):
        self.opened.append(replica)
        q = self.queues.setdefault(replica, asyncio.Queue())

        async def gen():
            yield []
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    return
                yield item

        return gen()


def test_subscriptions_dispatch_by_request_and_fail_only_the_broken_workers_requests():
    async def main():
        w = _FakeWorker()
        subs = Subscriptions(w.open_stream, connect_timeout_s=5)
        qa, qb, qc = subs.register("a"), subs.register("b"), subs.register("c")
        subs.attach("a", "w1")
        subs.attach("b", "w1")
        subs.attach("c", "w2")
        await asyncio.sleep(0)  # the readers start
        assert sorted(w.opened) == ["w1", "w2"]  # one stream per worker, not per request
        w.queues["w1"].put_nowait([_chunk("a", 0, [1]), _chunk("b", 0, [7])])
        w.queues["w1"].put_nowait([_chunk("a", 0, [2]), _chunk("zombie", 0, [5])])  # unknown ids are dropped
        w.queues["w2"].put_nowait([_chunk("c", 0, [3])])
        assert [(await qa.get())["token_ids"] for _ in range(2)] == [[1], [2]]
        assert (await qb.get())["token_ids"] == [7] and (await qc.get())["token_ids"] == [3]
        w.queues["w1"].put_nowait(RuntimeError("actor died"))
        err_a, err_b = await asyncio.wait_for(qa.get(), 5), await asyncio.wait_for(qb.get(), 5)
        assert isinstance(err_a, WorkerLostError) and isinstance(err_b, WorkerLostError)
        assert isinstance(err_a.__cause__, RuntimeError)
        assert qc.empty()  # w2's request is untouched
        w.queues["w2"].put_nowait([_chunk("c", 0, [4])])
        assert (await qc.get())["token_ids"] == [4]
        # A worker that ends its stream (idle) while a request is attached is read again.
        w.queues["w2"].put_nowait(None)
        await wait_until_async(lambda: w.opened.count("w2") == 2, timeout=10,
                               message=lambda: f"w2's stream opened again (opened: {w.opened})")
        subs.release("c")
        subs.close()

    asyncio.run(main())


def test_a_worker_that_never_answers_fails_its_requests():
    async def main():
        def never(replica):
            async def gen():
                await asyncio.Event().wait()
                yield []
            return gen()

        subs = Subscriptions(never, connect_timeout_s=0.1)
        q = subs.register("a")
        subs.attach("a", "w1")
        assert isinstance(await asyncio.wait_for(q.get(), 5), WorkerLostError)

    asyncio.run(main())
