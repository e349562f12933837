"""A trivial OpenAI-shaped streaming server at a fixed rate, to prove the load generator is not the cap.

Every chat completion streams `max_tokens` chunks of one token each, one every `interval_ms` (usage in
each chunk, as with continuous_usage_stats), then a finish chunk and [DONE]; the chunks are pre-encoded, so
the server's cost per event is one socket write. It runs in several processes on one port (SO_REUSEPORT).

`headroom(...)` starts it, drives it with benchmarks.loadgen at the given concurrency and reports what the
client sustained against what the server offered, and whether the per-token gaps it saw match the server's.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import socket
import time


def _chunk(i: int, content: str | None, finish: str | None) -> bytes:
    obj = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "sse",
           "choices": [{"index": 0, "delta": {} if content is None else {"content": content}, "finish_reason": finish}],
           "usage": {"prompt_tokens": 10, "completion_tokens": i, "total_tokens": 10 + i}}
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def _serve(port: int, interval_s: float, ready) -> None:
    from aiohttp import web

    cache: dict[int, list[bytes]] = {}

    async def chat(request):
        body = await request.json()
        n = int(body.get("max_tokens", 16))
        chunks = cache.get(n) or cache.setdefault(n, [_chunk(i + 1, " tok", None) for i in range(n)])
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        t = time.monotonic()
        try:
            for c in chunks:
                t += interval_s
                delay = t - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await resp.write(c)
            await resp.write(_chunk(n, None, "length") + b"data: [DONE]\n\n")
        except ConnectionError:  # the client closed the stream (the end of its window)
            pass
        return resp

    async def main():
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        await web.SockSite(runner, sock, backlog=4096).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def start(port: int, interval_ms: float, processes: int = 2) -> list:
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for _ in range(processes):
        ready = ctx.Event()
        p = ctx.Process(target=_serve, args=(port, interval_ms / 1000, ready), daemon=True)
        p.start()
        if not ready.wait(60):
            raise RuntimeError("the fixed-rate SSE server did not start")
        procs.append(p)
    return procs


def headroom(port: int, concurrency: int, interval_ms: float, seconds: float, server_processes: int,
             client_processes: int, max_tokens: int = 100_000) -> dict:
    """The load generator's own ceiling: tokens/s it sustained from a server offering
    concurrency * 1000 / interval_ms tokens/s, one token per event, with the gaps it measured."""
    from benchmarks import loadgen

    procs = start(port, interval_ms, server_processes)
    try:
        r = loadgen.run(f"http://127.0.0.1:{port}", "sse", loadgen.make_prompts(concurrency, (5, 10)), concurrency,
                        max_tokens, mode="window", warmup_s=min(5.0, seconds / 4), window_s=seconds,
                        processes=client_processes)
    finally:
        for p in procs:
            p.kill()
    offered = concurrency * 1000 / interval_ms
    itl = r["itl_ms_per_token"]
    return {"concurrency": concurrency, "interval_ms": interval_ms, "offered_tokens_per_s": offered,
            "sustained_tokens_per_s": r["tokens_per_s"], "sustained_over_offered": r["tokens_per_s"] / offered,
            "itl_ms_per_token": itl, "itl_p50_error": (itl.get("p50", float("nan")) - interval_ms) / interval_ms,
            "events_per_s": r["events"] / max(1e-9, r["span_s"] + r["warmup_s"]),
            "client_processes": client_processes, "server_processes": server_processes, "window_s": seconds}
