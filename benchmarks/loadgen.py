"""An OpenAI streaming load generator that is not the bottleneck: asyncio + aiohttp, in several processes.

Each process drives its share of the streams on its own event loop and timestamps every server-sent event
as it arrives (time.monotonic, one clock for all processes on a host); the parent merges the records and
computes the figures. Two ways to run:

- requests: `requests` chat completions, at most `concurrency` open at once, each to its end;
- window: `concurrency` streams kept open for warmup_s + window_s (a new request as one finishes, a stream
  still open at the end is closed); tokens are counted only when they arrive inside the window, so runs too
  long to finish (256 x 8k on a full-KV server) are measured over the same span for every system.

Tokens per event come from `stream_options.continuous_usage_stats` (usage in every chunk, vLLM's option,
which zipserve also serves); a server that sends no usage per chunk is counted as one token per content
event. Inter-token latency is per token: an event's gap to the previous one is spread over the tokens it
carries (a merged chunk of k tokens after 100 ms gives k samples of 100/k ms), so servers that merge tokens
and servers that send each token are measured alike. `headroom` (benchmarks/sse_server.py) proves the client
keeps up: the same client against a trivial server that streams at a fixed rate.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import time

WORDS = ("the state moves to a new value when each step adds the previous two then we check the parity of "
         "every term and write the result before the next line begins").split()


def make_prompts(n: int, words: tuple[int, int], seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["Reason step by step. " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
            for _ in range(n)]


def chat_body(model: str, content: str, max_tokens: int, continuous_usage: bool = True) -> dict:
    options = {"include_usage": True} | ({"continuous_usage_stats": True} if continuous_usage else {})
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": True, "stream_options": options, "ignore_eos": True, "temperature": 0.6, "top_p": 0.95}


async def stream_one(session, url: str, body: dict, stop_at: float) -> dict:
    """One streamed chat completion. Record: start, status, events [(time, tokens)], finish_reason,
    completion_tokens, done ([DONE] seen), end, error. A stream still open at stop_at is closed."""
    rec = {"start": time.monotonic(), "status": None, "events": [], "finish_reason": None,
           "completion_tokens": None, "done": False, "error": None}
    try:
        async with asyncio.timeout_at(stop_at):  # the loop's clock is time.monotonic
            await _read_stream(session, url, body, rec)
    except TimeoutError:
        rec["error"] = CLOSED_AT_END
    except Exception as e:  # noqa: BLE001 -- a client-side failure is a failed request, recorded as such
        rec["error"] = repr(e)[:300]
    rec["end"] = time.monotonic()
    return rec


CLOSED_AT_END = "closed at the end of the window"


async def _read_stream(session, url: str, body: dict, rec: dict) -> None:
    seen = 0
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        rec["status"] = r.status
        if r.status != 200:
            rec["error"] = (await r.text())[:300]
            return
        buf = b""
        async for part in r.content.iter_any():
            now = time.monotonic()
            *events, buf = (buf + part).split(b"\n\n")
            for ev in events:
                if not ev.startswith(b"data: "):
                    continue
                data = ev[6:]
                if data == b"[DONE]":
                    rec["done"] = True
                    continue
                obj = json.loads(data)
                if "error" in obj:
                    rec["error"] = str(obj["error"])[:300]
                    continue
                choices = obj.get("choices") or ()
                for c in choices:
                    if c.get("finish_reason"):
                        rec["finish_reason"] = c["finish_reason"]
                usage = obj.get("usage")
                if usage:
                    rec["completion_tokens"] = usage["completion_tokens"]
                    if usage["completion_tokens"] > seen:
                        rec["events"].append((now, usage["completion_tokens"] - seen))
                        seen = usage["completion_tokens"]
                elif any((c.get("delta") or {}).get("content") or c.get("text") for c in choices):
                    rec["events"].append((now, 1))
                    seen += 1


async def _drive(url: str, model: str, prompts: list[str], slots: int, max_tokens: int, mode: str,
                 t_start: float, stop_at: float, ramp_s: float, first_index: int, stride: int,
                 continuous_usage: bool) -> list[dict]:
    import aiohttp

    records: list[dict] = []
    counter = iter(range(first_index, 1 << 62, stride))
    timeout = aiohttp.ClientTimeout(total=None, sock_read=900)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False),
                                     timeout=timeout) as session:
        async def slot(j: int):
            await asyncio.sleep(max(0.0, t_start + ramp_s * j / max(1, slots) - time.monotonic()))
            while time.monotonic() < stop_at:
                i = next(counter)
                if mode == "requests" and i >= len(prompts):
                    return
                body = chat_body(model, prompts[i % len(prompts)], max_tokens, continuous_usage)
                rec = await stream_one(session, url, body, stop_at)
                rec["index"] = i
                records.append(rec)
                if rec["status"] == 429:
                    await asyncio.sleep(0.2)  # the server said it is full: back off before trying again

        await asyncio.gather(*(slot(j) for j in range(slots)))
    return records


def _process_main(args: tuple, conn) -> None:
    """A load process: say "ready" once started (a spawned interpreter takes seconds on a busy machine), take
    the common clock (t_start, stop_at) from the parent, drive, send the records back."""
    try:
        import aiohttp  # noqa: F401 -- imported before "ready": the import is not part of the run

        conn.send(("ready", None))
        t_start, stop_at = conn.recv()
        out = asyncio.run(_drive(*args[:6], t_start, stop_at, *args[6:]))
        conn.send(("ok", out))
    except BaseException as e:  # noqa: BLE001 -- the parent reports it
        conn.send(("error", repr(e)))
    finally:
        conn.close()


def run(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int, mode: str = "requests",
        warmup_s: float = 0.0, window_s: float = float("inf"), processes: int = 4, ramp_s: float = 0.0,
        max_s: float = 3600.0, slo_ttft_s: float = 2.0, slo_tpot_ms: float = 100.0,
        continuous_usage: bool = True) -> dict:
    """Drive the load and summarise it. mode "requests": len(prompts) requests (capped at max_s);
    "window": `concurrency` streams kept busy for warmup_s + window_s, counted over the window.
    continuous_usage False: for servers without continuous_usage_stats (each content event is one token,
    the final usage settles the count; per-token latencies are then per event)."""
    if mode not in ("requests", "window"):
        raise ValueError(f"mode must be 'requests' or 'window', not {mode!r}")
    processes = max(1, min(processes, concurrency))
    ctx = multiprocessing.get_context("spawn")
    procs, pipes = [], []
    for p in range(processes):
        slots = concurrency // processes + (p < concurrency % processes)
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=_process_main, daemon=True, args=(
            (url, model, prompts, slots, max_tokens, mode, ramp_s, p, processes, continuous_usage), theirs))
        proc.start()
        theirs.close()
        procs.append(proc)
        pipes.append(mine)

    def receive(conn) -> tuple:
        try:
            return conn.recv()
        except EOFError:
            return "error", "a load process died"

    records, errors = [], []
    started = [receive(conn) for conn in pipes]  # every process up before the clock starts
    errors += [payload for kind, payload in started if kind != "ready"]
    t_start = time.monotonic() + 0.5  # every process starts its streams on the same clock
    stop_at = t_start + (warmup_s + window_s if mode == "window" else max_s)
    for conn, (kind, _) in zip(pipes, started):
        if kind == "ready":
            conn.send((t_start, stop_at))
    for conn, (kind, _) in zip(pipes, started):
        if kind == "ready":
            kind, payload = receive(conn)
            (records.extend if kind == "ok" else errors.append)(payload)
    for proc in procs:
        proc.join(10)
    if errors:
        raise RuntimeError(f"load processes failed: {errors}")
    window = (t_start + warmup_s, t_start + warmup_s + window_s) if mode == "window" else None
    out = summarize(records, t_start, max_tokens, window, slo_ttft_s, slo_tpot_ms)
    out |= {"mode": mode, "concurrency": concurrency, "max_tokens": max_tokens, "processes": processes,
            "warmup_s": warmup_s if mode == "window" else 0.0, "window_s": window_s if mode == "window" else None,
            "ramp_s": ramp_s, "slo": {"ttft_s": slo_ttft_s, "tpot_ms": slo_tpot_ms}}
    return out


def percentiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    if not xs:
        return {}
    return {f"p{p}": xs[min(len(xs) - 1, int(p / 100 * len(xs)))] for p in (50, 90, 99)} | {"mean": sum(xs) / len(xs)}


def _token_itl_ms(events: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """(ms per token, token count) per event after the first: the gap spread over the event's tokens."""
    return [(1000 * (t1 - t0) / k, k) for (t0, _), (t1, k) in zip(events, events[1:])]


def _weighted_percentiles(pairs: list[tuple[float, int]]) -> dict:
    if not pairs:
        return {}
    pairs = sorted(pairs)
    total = sum(k for _, k in pairs)
    out, acc, i = {}, 0, 0
    for p in (50, 90, 99):
        target = p / 100 * total
        while i < len(pairs) - 1 and acc + pairs[i][1] <= target:
            acc += pairs[i][1]
            i += 1
        out[f"p{p}"] = pairs[i][0]
    out["mean"] = sum(v * k for v, k in pairs) / total
    return out


def summarize(records: list[dict], t_start: float, max_tokens: int, window: tuple[float, float] | None,
              slo_ttft_s: float, slo_tpot_ms: float) -> dict:
    """Figures of one run. Throughput counts tokens that arrived inside the window (requests mode: the whole
    run, first request sent to last token); latencies come from requests that completed, and, in window
    mode, started inside the window."""
    ok = [r for r in records if r["status"] == 200 and r["done"] and r["error"] is None and r["events"]]
    if window is None:
        lo, hi = t_start, max((r["end"] for r in records if "end" in r), default=t_start)
    else:
        lo, hi = window
    span = max(1e-9, hi - lo)
    tokens = sum(k for r in records for t, k in r["events"] if lo <= t <= hi)
    measured = [r for r in ok if window is None or r["start"] >= lo]
    ttft = [r["events"][0][0] - r["start"] for r in measured]
    e2e = [r["events"][-1][0] - r["start"] for r in measured]
    tpot = [1000 * (r["events"][-1][0] - r["events"][0][0]) / (r["completion_tokens"] - r["events"][0][1])
            for r in measured if (r["completion_tokens"] or 0) > r["events"][0][1]]
    itl = [x for r in records for x in _token_itl_ms([e for e in r["events"] if lo <= e[0] <= hi])]
    good = [r for r, f, p in zip(measured, ttft, tpot) if f <= slo_ttft_s and p <= slo_tpot_ms] if len(tpot) == len(
        measured) else [r for r in measured if r["events"][0][0] - r["start"] <= slo_ttft_s]
    events = sum(len(r["events"]) for r in records)
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    complete = [r for r in ok if r["finish_reason"] == "length" and r["completion_tokens"] == max_tokens]
    done_ids = {id(r) for r in complete}  # by identity: comparing records compares all their events
    cut = [r for r in records if r["status"] == 200 and id(r) not in done_ids and r["error"] != CLOSED_AT_END]
    curve = _tokens_per_second_curve(records, t_start, hi)
    return {
        "tokens": tokens, "span_s": span, "tokens_per_s": tokens / span,
        "requests_sent": len(records), "requests_complete": len(complete), "statuses": statuses,
        "truncated_or_failed_200": len(cut),
        "failures": [{k: r.get(k) for k in ("index", "status", "error", "finish_reason", "completion_tokens", "done")}
                     for r in cut[:20]],
        "closed_at_window_end": sum(r["error"] == CLOSED_AT_END for r in records),
        "events": events, "tokens_per_event": sum(k for r in records for _, k in r["events"]) / max(1, events),
        "ttft_s": percentiles(ttft), "itl_ms_per_token": _weighted_percentiles(itl), "tpot_ms": percentiles(tpot),
        "e2e_s": percentiles(e2e),
        "goodput": {"requests": len(good), "requests_per_s": len(good) / span,
                    "tokens_per_s": sum(r["completion_tokens"] or 0 for r in good) / span,
                    "of_measured": len(good) / max(1, len(measured))},
        "timeline": curve,
    }


def _tokens_per_second_curve(records: list[dict], t0: float, t1: float, points: int = 120) -> list[tuple]:
    """(seconds since start, tokens/s, open streams) in `points` bins, for the plots."""
    width = max(0.25, (t1 - t0) / points)
    n = int((t1 - t0) / width) + 1
    toks, opened = [0] * n, [0] * (n + 1)
    for r in records:
        for t, k in r["events"]:
            b = int((t - t0) / width)
            if 0 <= b < n:
                toks[b] += k
        if r["status"] == 200 and "end" in r:
            a, b = int(max(0.0, r["start"] - t0) / width), int(max(0.0, r["end"] - t0) / width)
            opened[min(a, n)] += 1
            opened[min(b + 1, n)] -= 1
    out, open_now = [], 0
    for b in range(n):
        open_now += opened[b]
        out.append((round(b * width, 3), toks[b] / width, open_now))
    return out
