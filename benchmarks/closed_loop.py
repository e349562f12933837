"""One step-loop driver for every engine in the throughput benchmark (ours in process, vLLM in its own
process), so their figures come from the same code: the same requests, the same clock, the same counts.

Two modes. `complete`: N requests at once, run to the end. `window`: closed loop, N requests in flight (a new
one as one finishes), tokens counted over a fixed window after a warm-up: for runs too long to finish in
one sitting, and for mixed lengths, where the steady state is what a server sees. Requests are made by
index from a seed, so every system gets the same sequence of prompts and lengths. No torch, no zipserve:
vLLM's process imports this with its own site packages.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    """Prompts of 100-500 tokens (even-numbered ones start with one shared 200-token system prompt), output
    length `output_len`, or with `mixed` a long-tailed length per request: log-normal around
    `output_len`, clipped to [min_len, max_len] (chains of thought are mostly medium with a long tail).

    `aged`: a closed loop reaches its steady state (requests of every age, so every cache size) only after
    a whole request lifetime. Starting the first requests part-way through their lives gets there at once:
    request i < aged carries a history of age_i = length x (aged - i - 1/2) / aged tokens as extra prompt
    and generates the rest. Oldest first, as a first-come-first-served queue holds them in a steady state
    (an engine that cannot hold them all admits the oldest, which finish first). To every engine a prefilled history costs the same memory as a generated one (a
    compressed engine compresses a long prompt to its budget when its prefill ends, as it would have
    compressed the generated history); only the warm-up's prefill work differs, and it is not counted. Only
    the requests an engine runs at once should be aged (`steady_running`): in a steady state the others wait,
    and a waiting request has generated nothing."""

    vocab: int
    output_len: int
    mixed: bool = False
    min_len: int = 2048
    max_len: int = 32768
    sigma: float = 0.8
    seed: int = 0
    aged: int = 0  # the first `aged` requests start part-way through their lives (see `request`)

    def _tokens(self, rng: random.Random, n: int) -> list[int]:
        lo = min(1000, self.vocab // 4)  # clear of special tokens
        return [rng.randrange(lo, self.vocab - lo) for _ in range(n)]

    def request(self, i: int) -> tuple[list[int], int]:
        """(prompt token ids, output length) of request i."""
        system = self._tokens(random.Random(self.seed), 200)
        rng = random.Random(f"{self.seed}:{i}")
        if i % 2 == 0:
            prompt = system + self._tokens(rng, rng.randint(100, 300))
        else:
            prompt = self._tokens(rng, rng.randint(100, 500))
        length = self.output_len
        if self.mixed:
            drawn = rng.lognormvariate(math.log(self.output_len), self.sigma)
            length = int(min(self.max_len, max(self.min_len, drawn)))
        if i < self.aged:  # its history so far as prompt: ages spread evenly over [0, length), oldest first
            age = int(length * (self.aged - i - 0.5) / self.aged)
            prompt, length = prompt + self._tokens(rng, age), length - age
        return prompt, length

    def describe(self) -> dict:
        return {"output_len": self.output_len, "mixed": self.mixed, "seed": self.seed, "aged": self.aged} | (
            {"min_len": self.min_len, "max_len": self.max_len, "sigma": self.sigma} if self.mixed else {})


def steady_running(workload: Workload, concurrency: int, pool_tokens: int, page_tokens: int,
                   budget_pages: int | None = None, sample: int = 1024) -> int:
    """How many of `concurrency` requests an engine with this pool runs at once in the closed loop's steady
    state: the `aged` count that starts it there. The rest wait, and a waiting request has generated
    nothing: aging it would make the engine prefill a history no real waiting request carries.

    Compressed (budget_pages): each request reserves budget + 1 pages. Full KV: as many aged requests as the
    pool holds, each its prompt, half its length (ages are spread evenly over each request's life) and half
    a page. With mixed lengths a true steady state runs long requests more often than they are drawn; the
    aged requests are drawn as every request is, so this counts what fills the pool with them. Not
    counted: prefix sharing (the system prompt) and an engine's own admission headroom (a few percent)."""
    if budget_pages is not None:
        return min(concurrency, pool_tokens // page_tokens // (budget_pages + 1))
    fresh = dataclasses.replace(workload, aged=0)
    drawn = [fresh.request(i) for i in range(sample)]
    held = sum(len(p) + n / 2 + page_tokens / 2 for p, n in drawn) / len(drawn)
    return max(1, min(concurrency, int(pool_tokens // held)))


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)
    return {f"p{p}": xs[min(len(xs) - 1, int(p / 100 * len(xs)))] for p in (50, 90, 99)} | {"mean": sum(xs) / len(xs)}


@dataclass
class Engine:
    """What the driver needs of an engine. `step` returns (request id, new tokens, finished) per request that
    changed; `running` the requests in its running batch now; `step_floor_s` the bandwidth floor of the step
    about to run (its weights and K/V bytes over the card's copy bandwidth), or None if unknown."""

    add: Callable[[str, list[int], int], None]
    step: Callable[[], list[tuple[str, int, bool]]]
    has_work: Callable[[], bool]
    running: Callable[[], int]
    step_floor_s: Callable[[], float | None] = lambda: None
    abort: Callable[[str], None] = lambda rid: None
    prefill_tokens: Callable[[], int] | None = None  # prompt (or recomputed) tokens run so far: steps with a prefill


class GcPauses:
    """Python's garbage-collector pauses while `on`: a pause stops the host's step loop, and once it outlasts
    the step the GPU has queued, the GPU waits. Counted by the collector's own callbacks, timed by the wall
    clock whatever clock the driver runs on; this process's collector only (vLLM's engine core runs in a
    process of its own)."""

    def __init__(self):
        self.on = False
        self.count, self.total_s, self.longest_s, self._start = 0, 0.0, 0.0, None
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            d, self._start = time.perf_counter() - self._start, None
            if self.on:
                self.count, self.total_s, self.longest_s = self.count + 1, self.total_s + d, max(self.longest_s, d)

    def close(self) -> dict:
        gc.callbacks.remove(self._callback)
        return {"pauses": self.count, "total_ms": 1e3 * self.total_s, "longest_ms": 1e3 * self.longest_s}


def drive(engine: Engine, workload: Workload, concurrency: int, mode: str = "complete", warmup_s: float = 60.0,
          window_s: float = 120.0, max_seconds: float = 600.0, timeline_points: int = 400,
          clock: Callable[[], float] = time.perf_counter, after: Callable[[], dict] | None = None) -> dict:
    """Run the workload; the figures in the result are over the whole run (`complete`) or the window: the
    steps that start and end inside it, over the time from the first one's start to the last one's end.
    `after` runs once the counted part is over, before the requests still in flight are aborted (a
    profile of the same steady state); what it returns joins the result."""
    if mode not in ("complete", "window"):
        raise ValueError(f"mode must be 'complete' or 'window', got {mode!r}")
    t0 = clock()
    added, first, last = {}, {}, {}
    ttft, gaps, timeline, ended = [], [], [], set()
    nxt = 0

    def add_next():
        nonlocal nxt
        prompt, length = workload.request(nxt)
        rid = f"r{nxt}"
        added[rid] = clock() - t0
        engine.add(rid, prompt, length)
        nxt += 1

    for _ in range(concurrency):
        add_next()
    lo, hi = (0.0, math.inf) if mode == "complete" else (warmup_s, warmup_s + window_s)
    tokens = finished = steps = 0
    floor_s, floor_known, running_sum, running_n, peak_running = 0.0, True, 0, 0, 0
    incomplete = False
    first_start = last_end = None  # of the steps counted
    # Counted steps: [steps, seconds]. Under async scheduling a step() call waits for the step before's
    # tokens, so a prefill's cost can land in the call after it: that call counts with the prefill.
    by_kind = {"decode": [0, 0.0], "with prefill": [0, 0.0]}
    decode_ms: list[float] = []
    prefilled = False  # the call before ran a prefill
    collector = GcPauses()
    try:
        while engine.has_work():
            floor = engine.step_floor_s()
            t_before = clock() - t0
            running = engine.running()
            prefill_before = engine.prefill_tokens() if engine.prefill_tokens is not None else 0
            outs = engine.step()
            t = clock() - t0
            n_step = 0
            for rid, n_new, done in outs:
                if n_new:
                    n_step += n_new
                    if rid not in first:
                        first[rid] = t
                        if lo <= added[rid] < hi:
                            ttft.append(t - added[rid])
                    elif lo <= t <= hi:
                        gaps += [(t - last[rid]) / n_new] * n_new  # per token: a merged output shares its gap
                    last[rid] = t
                if done:
                    ended.add(rid)
                    finished += lo <= t <= hi
                    if mode == "window" and t < hi:
                        add_next()
            collector.on = lo <= t <= hi
            if lo <= t_before and t <= hi:
                first_start = t_before if first_start is None else first_start
                last_end = t
                tokens += n_step
                steps += 1
                running_sum += running
                running_n += 1
                peak_running = max(peak_running, running)
                if engine.prefill_tokens is not None:
                    now_prefilled = engine.prefill_tokens() > prefill_before
                    kind = by_kind["with prefill" if now_prefilled or prefilled else "decode"]
                    kind[0] += 1
                    kind[1] += t - t_before
                    if kind is by_kind["decode"]:
                        decode_ms.append(1e3 * (t - t_before))
                    prefilled = now_prefilled
                if floor is None:
                    floor_known = False
                else:
                    floor_s += floor
            timeline.append((round(t, 3), running, n_step))
            if mode == "window" and t >= hi:
                break
            if t > max_seconds:
                incomplete = True
                break
    finally:
        gc_pauses = collector.close()
    extra = after() if after is not None and engine.has_work() else {}
    for rid in [r for r in added if r not in ended]:  # the window's end (or the time limit) cut them off
        engine.abort(rid)
    span = last_end - first_start if steps else 0.0  # the time the counted steps took
    result = {
        "mode": mode, "concurrency": concurrency, "workload": workload.describe(), "complete": not incomplete,
        "output_tokens": tokens, "span_s": span, "tokens_per_s": tokens / span if span > 0 else 0.0,
        "requests_finished": finished, "requests_started": nxt, "steps": steps,
        "mean_running": running_sum / running_n if running_n else 0.0, "peak_running": peak_running,
        "ttft_s": percentiles(ttft), "itl_ms": {k: 1e3 * v for k, v in percentiles(gaps).items()},
        "timeline": thin(timeline, timeline_points), "gc_pauses": gc_pauses,
    } | ({"window": [lo, hi]} if mode == "window" else {}) | extra
    if floor_known and steps:
        result |= {"bandwidth_floor_s": floor_s, "floor_fraction": floor_s / span}
    if engine.prefill_tokens is not None and steps:
        result["steps_by_kind"] = step_kinds(by_kind, span) | {"decode_ms": percentiles(decode_ms)}
    return result


def step_kinds(by_kind: dict, span: float) -> dict:
    """Counted steps split by whether they (or the step before: see drive) ran a prefill chunk (a step that
    admits a request cannot replay a decode graph), with the share of the window the prefill steps took
    beyond a decode step's mean time."""
    out = {k: {"steps": n, "mean_ms": 1e3 * s / n if n else None} for k, (n, s) in by_kind.items()}
    (nd, sd), (npf, spf) = by_kind["decode"], by_kind["with prefill"]
    if nd and npf:
        out["prefill_steps_excess_share"] = (spf - npf * sd / nd) / span
    return out


def thin(timeline: list, points: int = 400) -> list:
    """At most `points` (time, running, tokens/s) samples: tokens summed over each bucket of steps."""
    if not timeline:
        return []
    k = max(1, -(-len(timeline) // points))
    out, prev_t = [], 0.0
    for i in range(0, len(timeline), k):
        chunk = timeline[i : i + k]
        t = chunk[-1][0]
        out.append((t, chunk[-1][1], sum(c[2] for c in chunk) / max(1e-9, t - prev_t)))
        prev_t = t
    return out
