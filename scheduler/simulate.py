"""A discrete-event simulator: replay a request trace against N simulated workers under a routing policy.

Every policy is driven the same way (`choose(req, workers) -> Decision`, plus optional hooks), so policies
are compared side by side on the same trace, cost model and engine model. Pure Python, deterministic.

The simulated worker is a small model of our engine (workers/scheduler.py + workers/block_manager.py):

* Page pool. `total_pages` pages of `block_size` tokens. Free pages form one LRU queue (head evicted
  first); a freed page keeps its hash (stays a cached prefix page) until a fresh allocation pops it. A
  request's pages are released tail first, so a prefix outlives the pages after it (as in the engine).
* Prefix cache. A page gets its chained hash (workers/pages.page_hashes) once it is full and
  computed, prompt pages and generated pages alike, while the request is uncompressed; a hash already
  cached elsewhere is not registered twice. At admission the leading prompt pages found in the cache are
  shared (at most (P - 1) // block_size of them: one token is always computed).
* Compression (budget B pages). When a request's cache reaches B + 1 full pages after a decode step, or
  its prompt is longer than that when its prefill ends, it is compressed to B pages + 1 working page,
  as `BlockManager.plan_compaction` does at the first compression: its own unhashed pages are reused
  first; pages holding a hash are *spared* (fresh pages are used instead and the hashed pages are
  released still cached) while the worker has unreserved free pages to spare, else overwritten (their
  hashes are lost); shared pages are never written. So after a request compresses, its prompt pages and
  the generated pages it filled before compressing stay cached (LRU) when the pool has room; pages it
  fills afterwards are never cached. Later compressions happen in place (no page or cache change) and
  cost no time (the engine overlaps them on their own CUDA stream).
* Admission: FCFS with reservation, as the engine's reserved path. The head of the queue is admitted
  when a slot is free, the step has token budget left, and its page need (workers/pages.admission_pages,
  the engine's and the router's formula: pages(min(P + max_tokens, max(P, (B + 1) * page))) minus cache
  hits, plus the free cached pages it takes and the pages their one other holder must then privatise)
  fits in the free pages nobody has reserved; else it and everyone behind it wait. (In the engine the
  holder's own reservation grows by those pages, recomputed every step; this model reserves them with
  the newcomer.) Opportunistic admission and preemption are not modelled (with reservations only,
  nobody is ever preempted).
* Steps. One engine step runs one token for every decoding request and prefill chunks (chunked prefill,
  in admission order) with the rest of the `max_batched_tokens` budget; a request whose last prompt chunk
  runs samples its first token at the end of that step. A step takes
  `t_fixed + t_decode * n_decode + t_prefill * n_prefill` seconds. (Deviation: the engine serves running
  requests strictly in admission order, so a long prefill chunk can, rarely, starve a later decoder of
  one step; here decode tokens are never starved.) An idle worker starts its next step once every request
  arriving at that instant is queued (32 samples sent together are admitted together). Runs of identical
  decode-only steps are simulated in one event, cut short when something arrives.
* A prompt page is hashed only once computed (end of its step), as in the engine, so requests admitted in
  the same step as the first reader of a prefix do not share it.

The router sees each worker through a `WorkerState` refreshed every `report_interval_s` (stale in
between) and adds its own bookkeeping: requests it sent a worker since that worker's last report count
in `in_flight` and `in_flight_pages` (their peak pages minus the hits it expects from the report).
Requests reach their worker at once (no network delay), so a report reflects everything sent before it.

Optional policy hooks (called if the policy has them): `on_routed(req, worker_id, now)`,
`on_first_token(req, worker_id, now)`, `on_finished(req, worker_id, now)` (a proxying router sees these).
"""

from __future__ import annotations

import copy
import heapq
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from zipserve.scheduler.policy import RouteRequest, WorkerState
from zipserve.workers.pages import admission_pages, page_hashes


# ---- configuration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostModel:
    """Seconds per engine step. Defaults: roughly an 8B model (Qwen3-8B / Llama-3-8B, bf16) on one H100:
    ~8 ms of fixed cost per step (weights read, launch overheads), ~0.05 ms per decode token (attention
    over a ~2k-token compressed cache plus the per-token MLP work), ~0.06 ms per prefill token (~16k
    prefill tokens/s). The README's decode-step figures say how far our kernels are from these; the
    comparison between policies does not depend much on them."""

    t_fixed_s: float = 8e-3
    t_decode_s: float = 5e-5
    t_prefill_s: float = 6e-5

    def step_s(self, n_decode: int, n_prefill: int) -> float:
        return self.t_fixed_s + self.t_decode_s * n_decode + self.t_prefill_s * n_prefill


@dataclass(frozen=True)
class WorkerConfig:
    """One worker. Defaults: Qwen3-8B (36 layers x 8 KV heads x 128 dims x 2 (K, V) x 2 bytes = 144 KiB per
    token) on an 80 GB H100 with ~52 GB for KV: ~352k tokens = 1376 pages of 256 tokens; budget 8 pages
    (Zipage's math setting: 8 x 256 kept + 1 working page), 256 slots, 8192 tokens per step."""

    total_pages: int = 1376
    block_size: int = 256
    budget_blocks: int | None = 8
    max_slots: int = 256
    max_batched_tokens: int = 8192
    # What-if (not the engine today): a compressing request may also spend its own unused reservation on
    # fresh pages that spare its cached pages (the engine counts only pages nobody reserved).


@dataclass(eq=False)
class TraceRequest:
    """One request of a trace. `after`: the request (previous chat turn) whose answer this prompt contains;
    it is released `think_s` after that one finishes (and not before `arrival_s`)."""

    rid: int
    arrival_s: float
    prompt: list  # token ids
    output_len: int  # tokens it will generate (<= max_tokens)
    max_tokens: int
    answer: list | None = None  # the generated token ids (needed when a later prompt contains them)
    after: int | None = None
    think_s: float = 0.0
    kind: str = ""
    _hashes: dict = field(default_factory=dict, repr=False)  # block_size -> (prompt page hashes, all page hashes)

    def hashes(self, block_size: int) -> tuple[list, list]:
        """(hashes of the prompt's full pages, hashes of every full page of prompt + answer)."""
        got = self._hashes.get(block_size)
        if got is None:
            ph = page_hashes(self.prompt, block_size)
            full = page_hashes(self.prompt + self.answer[: self.output_len], block_size, ph) if self.answer else ph
            got = self._hashes[block_size] = (ph, full)
        return got


@dataclass(frozen=True)
class SimRouteRequest(RouteRequest):
    """What the router knows of a request: RouteRequest plus an id and the prompt's token ids (text-level
    routers index those)."""

    rid: int = -1
    token_ids: tuple = ()


def peak_pages(num_prompt: int, max_tokens: int, hits: int, block_size: int, budget: int | None) -> int:
    """Pages a fresh request needs with `hits` live cached prefix pages (workers/pages.admission_pages)."""
    return admission_pages(num_prompt, num_prompt + max_tokens, block_size, budget, hits)


# ---- the page pool ---------------------------------------------------------------------------------
class _Run:
    """A run of consecutive unhashed free pages in the LRU queue (pages are interchangeable)."""

    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n


class PagePool:
    """Page counts, ref-counted cached hashes and the LRU free queue (pages are anonymous: a request's
    table holds, per page, its hash or None)."""

    def __init__(self, total: int):
        self.total = total
        self.ref: dict = {}  # hash -> references (0: free, still cached, in the queue)
        self.freeq: OrderedDict = OrderedDict([(_Run(total), None)])  # head = evicted first
        self.num_free = total
        self.version = 0  # bumped whenever the set of cached hashes changes

    def pop(self, k: int) -> None:
        """Take k fresh pages from the head of the queue (a cached page taken loses its hash)."""
        if k <= 0:
            return
        if k > self.num_free:
            raise RuntimeError(f"out of pages: need {k}, have {self.num_free}")
        self.num_free -= k
        fq = self.freeq
        while k:
            key = next(iter(fq))
            if type(key) is _Run:
                if key.n > k:
                    key.n -= k
                    return
                k -= key.n
                del fq[key]
            else:
                del fq[key]
                del self.ref[key]
                self.version += 1
                k -= 1

    def take(self, h) -> None:
        """Share a cached page (a prefix hit)."""
        c = self.ref[h]
        if c == 0:
            del self.freeq[h]
            self.num_free -= 1
        self.ref[h] = c + 1

    def register(self, h) -> bool:
        if h in self.ref:
            return False
        self.ref[h] = 1
        self.version += 1
        return True

    def forget(self, h) -> None:
        """An own hashed page is overwritten: it keeps being used, unhashed."""
        del self.ref[h]
        self.version += 1

    def release(self, table: list) -> None:
        """Drop one reference to each page, tail first (freed pages go to the back of the queue)."""
        fq = self.freeq
        for x in reversed(table):
            if x is None:
                last = next(reversed(fq)) if fq else None
                if type(last) is _Run:
                    last.n += 1
                else:
                    fq[_Run(1)] = None
                self.num_free += 1
            else:
                c = self.ref[x] - 1
                self.ref[x] = c
                if c == 0:
                    fq[x] = None
                    self.num_free += 1


# ---- the worker --------------------------------------------------------------------------------------
class _Seq:
    __slots__ = ("rid", "req", "route", "P", "out", "max_tokens", "hashes", "n_prompt_pages", "arrival",
                 "peak", "hits", "owned", "table", "kv", "computed", "gen", "committed", "compressed",
                 "prefill_done", "first_token_s", "admit_s", "worker")

    def __init__(self, req: TraceRequest, route: SimRouteRequest, hashes: tuple[list, list], arrival: float):
        self.rid, self.req, self.route = req.rid, req, route
        self.P, self.out, self.max_tokens = len(req.prompt), req.output_len, req.max_tokens
        self.n_prompt_pages = len(hashes[0])
        self.hashes = hashes[1]
        self.arrival = arrival
        self.peak = self.hits = self.owned = self.kv = self.computed = self.gen = self.committed = 0
        self.table: list = []
        self.compressed = self.prefill_done = False
        self.first_token_s = self.admit_s = None
        self.worker = None


class SimWorker:
    def __init__(self, wid: str, cfg: WorkerConfig, cost: CostModel, sim: "Simulator"):
        self.id, self.cfg, self.cost, self.sim = wid, cfg, cost, sim
        self.bs, self.B = cfg.block_size, cfg.budget_blocks
        self.pool = PagePool(cfg.total_pages)
        self.running: list[_Seq] = []  # admission order
        self.waiting: deque[_Seq] = deque()
        self.outstanding = 0  # pages reserved by running requests and not yet allocated
        self.busy = self.waking = False
        self.version = 0  # invalidates stale step-end events
        self.t0 = self.dt = 0.0
        self.k = self.done = 0  # steps in the current run of steps, steps already applied
        self.chunks: list = []
        self.decoders: list[_Seq] = []
        self._cached = frozenset()
        self._cached_version = -1
        self.generated = 0  # output tokens so far
        self.stats = dict(prefill_tokens=0, hit_tokens=0, prompt_tokens=0, steps=0, busy_s=0.0, compressions=0,
                          spared_pages=0, admitted=0)

    # ---- state -------------------------------------------------------------------------------------
    def available(self) -> int:
        """Free pages nobody has reserved."""
        return self.pool.num_free - self.outstanding

    def pages_in_use(self) -> int:
        return self.pool.total - self.pool.num_free

    def snapshot(self, now: float) -> WorkerState:
        self.materialize(now)
        if self._cached_version != self.pool.version:
            self._cached = frozenset(self.pool.ref)
            self._cached_version = self.pool.version
        c = self.cfg
        return WorkerState(worker_id=self.id, block_size=c.block_size, total_pages=c.total_pages,
                           free_pages=self.available(), max_slots=c.max_slots, running=len(self.running),
                           waiting=len(self.waiting), budget_blocks=c.budget_blocks, cached=self._cached,
                           timestamp=now)

    # ---- arrivals ----------------------------------------------------------------------------------
    def add(self, s: _Seq, now: float) -> None:
        s.worker = self
        self.waiting.append(s)
        if not self.busy:
            if not self.waking:  # start once every request arriving at this instant is in
                self.waking = True
                self.sim._push(now, 2, self, None)
        elif self.k > 1 and len(self.waiting) == 1 and len(self.running) < self.cfg.max_slots:
            self._truncate(now)  # it may be admitted at the next step boundary

    def _truncate(self, now: float) -> None:
        """End the current run of decode steps with the step in progress."""
        self.materialize(now)
        cur = self.done + 1
        if cur < self.k:
            self.k = cur
            self.version += 1
            self.sim._push(self.t0 + self.k * self.dt, 0, self, self.version)

    def materialize(self, now: float) -> None:
        """Apply the decode steps of the current run that have ended by `now` (all but its last)."""
        if not self.busy or self.k <= 1:
            return
        j = min(self.k - 1, int((now - self.t0) / self.dt + 1e-9))
        if j > self.done:
            for s in self.decoders:
                self._advance(s, j - self.done)
            self.done = j

    # ---- pages -------------------------------------------------------------------------------------
    def _alloc(self, s: _Seq, kv_target: int) -> None:
        need = -(-kv_target // self.bs) - len(s.table)
        if need > 0:
            self.pool.pop(need)
            s.table.extend([None] * need)
            s.owned += need
            self.outstanding -= need
            if self.sim.check:
                assert s.owned <= s.peak, (s.rid, s.owned, s.peak)

    def _commit(self, s: _Seq) -> None:
        full = s.kv // self.bs
        if full <= s.committed:
            return
        table, hashes, pool = s.table, s.hashes, self.pool
        nh = len(hashes)
        for i in range(s.committed, full):
            if table[i] is None:
                h = hashes[i] if i < nh else (s.rid, i)  # a page holding generated tokens nobody else has
                if pool.register(h):
                    table[i] = h
        s.committed = full

    def _advance(self, s: _Seq, j: int) -> None:
        """j decode steps of `s`."""
        self.generated += j
        s.gen += j
        s.computed += j
        if s.compressed:  # its cache cycles inside its B + 1 pages
            return
        s.kv += j
        self._alloc(s, s.kv)
        self._commit(s)

    def _lookup(self, s: _Seq) -> list:
        ref, out = self.pool.ref, []
        for h in s.hashes[: min((s.P - 1) // self.bs, s.n_prompt_pages)]:
            if h not in ref:
                break
            out.append(h)
        return out

    def admission_need(self, num_prompt: int, max_tokens: int, hits: list) -> int:
        """Free pages a fresh request with these cached prefix pages needs here (the engine's rule)."""
        ref = self.pool.ref
        unheld = sum(1 for h in hits if ref[h] == 0)
        held_once = sum(1 for h in hits if ref[h] == 1)
        return admission_pages(num_prompt, num_prompt + max_tokens, self.bs, self.B, len(hits), unheld, held_once)

    def _compress(self, s: _Seq) -> None:
        """The first compression of `s` (BlockManager.plan_compaction's page choice)."""
        pool, table, want = self.pool, s.table, self.B + 1
        spare = max(0, self.available())
        own_unhashed = [i for i, x in enumerate(table) if x is None]
        hashed_writable = [i for i, x in enumerate(table) if x is not None and pool.ref[x] == 1]
        dest = own_unhashed[:want]
        need = want - len(dest)
        required = max(0, need - len(hashed_writable))
        fresh = required + max(0, min(need - required, spare - required))
        overwrite = hashed_writable[: need - fresh]
        for i in overwrite:
            pool.forget(table[i])
        pool.pop(fresh)
        keep = set(dest) | set(overwrite)
        pool.release([x for i, x in enumerate(table) if i not in keep])
        self.outstanding -= s.peak - s.owned
        s.peak = s.owned = want
        s.table = [None] * want
        s.kv = self.B * self.bs
        s.compressed = True
        self.stats["compressions"] += 1
        self.stats["spared_pages"] += fresh - required

    # ---- steps -------------------------------------------------------------------------------------
    def _start(self, now: float) -> None:
        bs, cfg, pool = self.bs, self.cfg, self.pool
        decoders = []
        for s in self.running:
            if s.prefill_done:
                decoders.append(s)
                if not s.compressed and s.kv % bs == 0:
                    self._alloc(s, s.kv + 1)  # the engine allocates before admitting anyone
        budget = cfg.max_batched_tokens - len(decoders)
        chunks, n_pref = [], 0
        for s in self.running:
            if not s.prefill_done and budget > 0:
                n = min(s.P - s.computed, budget)
                self._alloc(s, s.kv + n)
                chunks.append((s, n))
                budget -= n
                n_pref += n
        while self.waiting and budget > 0 and len(self.running) < cfg.max_slots:
            s = self.waiting[0]
            hits = self._lookup(s)
            need = self.admission_need(s.P, s.max_tokens, hits)
            if self.available() < need:
                break
            # the free cached pages it takes leave the pool now; the rest is reserved
            peak = need - sum(1 for h in hits if pool.ref[h] == 0)
            self.waiting.popleft()
            for h in hits:
                pool.take(h)
            s.hits = s.committed = len(hits)
            s.table = list(hits)
            s.kv = s.computed = s.hits * bs
            s.peak, s.owned = peak, 0
            s.admit_s = now
            self.outstanding += peak
            n = min(s.P - s.computed, budget)
            self._alloc(s, s.kv + n)
            self.running.append(s)
            chunks.append((s, n))
            budget -= n
            n_pref += n
            st = self.stats
            st["hit_tokens"] += s.hits * bs
            st["prompt_tokens"] += s.P
            st["admitted"] += 1
        if not chunks and not decoders:
            self.busy = False
            return
        k = 1
        if not chunks:  # decode only: identical steps until someone finishes or first compresses
            k = min(s.out - s.gen for s in decoders)
            if self.B is not None:
                limit = (self.B + 1) * bs
                for s in decoders:
                    if not s.compressed:
                        k = min(k, limit - s.kv)
        self.t0, self.dt, self.k, self.done = now, self.cost.step_s(len(decoders), n_pref), max(1, k), 0
        self.chunks, self.decoders = chunks, decoders
        self.busy = True
        self.version += 1
        self.sim._push(now + self.k * self.dt, 0, self, self.version)

    def _end(self, now: float) -> None:
        j = self.k - self.done
        for s in self.decoders:
            self._advance(s, j)
        st = self.stats
        st["steps"] += self.k
        st["busy_s"] += self.k * self.dt
        sampled = list(self.decoders)
        for s, n in self.chunks:
            s.computed += n
            s.kv += n
            st["prefill_tokens"] += n
            self._commit(s)
            if s.computed == s.P:
                s.prefill_done = True
                s.gen = 1
                self.generated += 1
                s.first_token_s = now
                self.sim._first_token(s, now)
                sampled.append(s)
        done = [s for s in sampled if s.gen >= s.out]
        if done:
            gone = set(done)
            self.running = [s for s in self.running if s not in gone]
            for s in done:
                self.pool.release(s.table)
                self.outstanding -= s.peak - s.owned
                s.table = []
                self.sim._finished(s, now)
        if self.B is not None:
            limit = (self.B + 1) * self.bs
            for s in sampled:
                if not s.compressed and s.gen < s.out and s.kv >= limit:
                    self._compress(s)
        if self.sim.check:
            self.check_invariants()
        self._start(now)

    def check_invariants(self) -> None:
        pool = self.pool
        refs: dict = {}
        own = 0
        for s in self.running:
            for x in s.table:
                if x is None:
                    own += 1
                else:
                    refs[x] = refs.get(x, 0) + 1
        for h, c in pool.ref.items():
            assert c == refs.get(h, 0), f"{self.id}: ref count of a page disagrees"
            assert (c == 0) == (h in pool.freeq)
        assert set(refs) <= set(pool.ref)
        free = sum(k.n if type(k) is _Run else 1 for k in pool.freeq)
        assert free == pool.num_free, (free, pool.num_free)
        assert own + len(refs) + pool.num_free == pool.total, "pages leak"
        assert 0 <= self.outstanding == sum(s.peak - s.owned for s in self.running), "reservations"
        assert self.available() >= 0
        assert len(self.running) <= self.cfg.max_slots


# ---- the simulator ----------------------------------------------------------------------------------
def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Simulator:
    """Replay `trace` on `n_workers` identical workers under `policy`; `run()` returns the metrics."""

    def __init__(self, trace: list[TraceRequest], policy, n_workers: int = 4, worker: WorkerConfig = WorkerConfig(),
                 cost: CostModel = CostModel(), report_interval_s: float = 0.1, check: bool = False):
        if report_interval_s <= 0:
            raise ValueError("report_interval_s must be > 0")
        self.trace, self.policy, self.cfg, self.cost = trace, policy, worker, cost
        self.report_interval_s = report_interval_s
        self.check = check
        bs = worker.block_size
        self.workers = [SimWorker(f"w{i}", worker, cost, self) for i in range(n_workers)]
        self.by_id = {w.id: w for w in self.workers}
        self.reqs = {r.rid: r for r in trace}
        if len(self.reqs) != len(trace):
            raise ValueError("request ids must be unique")
        self.children: dict[int, list[TraceRequest]] = {}
        for r in trace:
            if not 1 <= r.output_len <= r.max_tokens:
                raise ValueError(f"request {r.rid}: output_len must be in [1, max_tokens]")
            if peak_pages(len(r.prompt), r.max_tokens, 0, bs, worker.budget_blocks) > worker.total_pages:
                raise ValueError(f"request {r.rid} can never fit a worker's page pool")
            if r.after is not None:
                if r.after not in self.reqs:
                    raise ValueError(f"request {r.rid} follows unknown request {r.after}")
                self.children.setdefault(r.after, []).append(r)
        self.on_routed = getattr(policy, "on_routed", None)
        self.on_first = getattr(policy, "on_first_token", None)
        self.on_finished = getattr(policy, "on_finished", None)
        self._heap: list = []
        self._n = 0

    def _push(self, t: float, prio: int, a, b=None) -> None:
        self._n += 1
        heapq.heappush(self._heap, (t, prio, self._n, a, b))

    # ---- callbacks from workers ------------------------------------------------------------------
    def _first_token(self, s: _Seq, now: float) -> None:
        if self.on_first is not None:
            self.on_first(s.route, s.worker.id, now)

    def _finished(self, s: _Seq, now: float) -> None:
        if s.rid in self.finish:
            raise AssertionError(f"request {s.rid} finished twice")
        self.finish[s.rid] = now
        self.records.append(dict(rid=s.rid, worker=s.worker.id, arrival=s.arrival, admit=s.admit_s,
                                 first_token=s.first_token_s, finish=now, prompt=s.P, hits=s.hits * self.cfg.block_size,
                                 output=s.out, kind=s.req.kind))
        if self.on_finished is not None:
            self.on_finished(s.route, s.worker.id, now)
        for child in self.children.get(s.rid, ()):
            self._push(max(child.arrival_s, now + child.think_s), 1, child)

    # ---- routing -----------------------------------------------------------------------------------
    def _route(self, r: TraceRequest, now: float) -> None:
        bs = self.cfg.block_size
        ph, full = r.hashes(bs)
        route = SimRouteRequest(num_prompt_tokens=len(r.prompt), page_hashes=tuple(ph), max_tokens=r.max_tokens,
                                rid=r.rid, token_ids=r.prompt)
        views = []
        for w in self.workers:
            v = copy.copy(self.reports[w.id])
            v.in_flight = self.in_flight[w.id]
            v.in_flight_pages = self.in_flight_pages[w.id]
            views.append(v)
        d = self.policy.choose(route, views)
        if d.worker_id not in self.by_id:
            raise RuntimeError(f"policy chose {d.worker_id!r}, not a worker")
        v = views[[w.id for w in self.workers].index(d.worker_id)]
        self.in_flight[d.worker_id] += 1
        self.in_flight_pages[d.worker_id] += v.peak_pages(route, v.hit_pages(route))
        self.routed[d.worker_id] += 1
        if self.on_routed is not None:
            self.on_routed(route, d.worker_id, now)
        self.by_id[d.worker_id].add(_Seq(r, route, (ph, full), now), now)

    def _report(self, now: float) -> None:
        used = []
        for w in self.workers:
            self.reports[w.id] = w.snapshot(now)
            self.in_flight[w.id] = 0
            self.in_flight_pages[w.id] = 0
            used.append(w.pages_in_use())
        mean = sum(used) / len(used)
        self.samples.append((now, max(used) / mean if mean > 0 else None, used))
        # Saturated throughput: output tokens generated over the intervals that began with requests waiting.
        gen = sum(w.generated for w in self.workers)
        waiting = sum(len(w.waiting) for w in self.workers)
        if self._last_tick is not None and self._last_tick[2] > 0:
            self.sat_tokens += gen - self._last_tick[1]
            self.sat_time += now - self._last_tick[0]
        self._last_tick = (now, gen, waiting)

    # ---- run ---------------------------------------------------------------------------------------
    def run(self) -> dict:
        wall = time.perf_counter()
        self.finish: dict[int, float] = {}
        self.records: list[dict] = []
        self.samples: list = []
        self.in_flight = {w.id: 0 for w in self.workers}
        self.in_flight_pages = {w.id: 0 for w in self.workers}
        self.routed = {w.id: 0 for w in self.workers}
        self.reports: dict[str, WorkerState] = {}
        self.sat_tokens, self.sat_time, self._last_tick = 0, 0.0, None
        roots = [r for r in self.trace if r.after is None]
        for r in roots:
            self._push(r.arrival_s, 1, r)
        start = min((r.arrival_s for r in roots), default=0.0)
        self._report(start)
        self._push(start + self.report_interval_s, 3, None)
        total = len(self.trace)
        while self._heap:
            t, prio, _, a, b = heapq.heappop(self._heap)
            if prio == 0:
                if b == a.version:
                    a._end(t)
            elif prio == 1:
                self._route(a, t)
            elif prio == 2:
                a.waking = False
                if not a.busy:
                    a._start(t)
            elif len(self.finish) < total:
                if not any(w.busy for w in self.workers) and any(w.waiting for w in self.workers):
                    raise RuntimeError("simulated workers hold waiting requests but none is running")
                self._report(t)
                self._push(t + self.report_interval_s, 3, None)
        if len(self.finish) != total:
            raise RuntimeError(f"{total - len(self.finish)} requests never finished")
        return self._summary(time.perf_counter() - wall)

    def _summary(self, wall_s: float) -> dict:
        recs = self.records
        t_first = min(r["arrival"] for r in recs)
        t_last_arrival = max(r["arrival"] for r in recs)
        makespan = max(r["finish"] for r in recs) - t_first
        out_tokens = sum(r["output"] for r in recs)
        prompt_tokens = sum(r["prompt"] for r in recs)
        hit_tokens = sum(r["hits"] for r in recs)
        window = [x for t, x, _ in self.samples if t_first <= t <= t_last_arrival and x is not None]
        e2e = [r["finish"] - r["arrival"] for r in recs]
        ttft = [r["first_token"] - r["arrival"] for r in recs]
        queue = [r["admit"] - r["arrival"] for r in recs]
        ws = [w.stats for w in self.workers]
        return dict(
            requests=len(recs),
            makespan_s=makespan,
            goodput_tok_s=out_tokens / makespan if makespan > 0 else None,
            goodput_req_s=len(recs) / makespan if makespan > 0 else None,
            saturated_tok_s=self.sat_tokens / self.sat_time if self.sat_time > 0 else None,
            saturated_s=self.sat_time,
            output_tokens=out_tokens,
            prompt_tokens=prompt_tokens,
            hit_tokens=hit_tokens,
            hit_rate=hit_tokens / prompt_tokens if prompt_tokens else 0.0,
            prefill_tokens=sum(s["prefill_tokens"] for s in ws),
            imbalance=sum(window) / len(window) if window else None,
            latency_p50_s=_percentile(e2e, 50), latency_p99_s=_percentile(e2e, 99),
            ttft_p50_s=_percentile(ttft, 50), ttft_p99_s=_percentile(ttft, 99),
            queue_p50_s=_percentile(queue, 50), queue_p99_s=_percentile(queue, 99),
            compressions=sum(s["compressions"] for s in ws),
            routed=dict(self.routed),
            busy_fraction={w.id: round(w.stats["busy_s"] / makespan, 4) if makespan > 0 else None
                           for w in self.workers},
            sim_wall_s=wall_s,
        )


def simulate(trace, policy, **kw) -> dict:
    return Simulator(trace, policy, **kw).run()


# ---- capacity ---------------------------------------------------------------------------------------
def estimate_capacity(trace: list[TraceRequest], n_workers: int, worker: WorkerConfig = WorkerConfig(),
                      cost: CostModel = CostModel()) -> dict:
    """Requests/s the cluster sustains on this trace, from the cost model (no simulation).

    GPU seconds per request = output tokens x (t_decode + t_fixed / b) + uncached prompt tokens x t_prefill,
    where b (requests decoding at once at saturation) = min(slots, total pages / mean peak pages). `ideal`
    takes the cache hits that one infinite cache would give (perfect affinity: every prefix computed once,
    with the engine's rule of which pages stay cached); `no_cache` takes none."""
    bs, B = worker.block_size, worker.budget_blocks
    seen: set = set()
    rows = []
    for r in sorted(trace, key=lambda r: (r.arrival_s, r.rid)):
        ph, full = r.hashes(bs)
        P = len(r.prompt)
        hits = 0
        for h in ph[: (P - 1) // bs]:
            if h not in seen:
                break
            hits += 1
        rows.append((P, r.output_len, hits, peak_pages(P, r.max_tokens, hits, bs, B),
                     peak_pages(P, r.max_tokens, 0, bs, B)))
        last_kv = P + r.output_len - 1
        if B is None or last_kv < (B + 1) * bs and P < (B + 1) * bs:
            n_cached = last_kv // bs
        else:
            n_cached = B + 1 if P < (B + 1) * bs else P // bs
        seen.update(full[:n_cached])
    n = len(rows)
    out = sum(x[1] for x in rows) / n

    def cap(uncached: float, peak: float) -> tuple[float, float]:
        b = max(1.0, min(worker.max_slots, worker.total_pages / peak))
        per_req = out * (cost.t_decode_s + cost.t_fixed_s / b) + uncached * cost.t_prefill_s
        return n_workers / per_req, b

    ideal, b_ideal = cap(sum(x[0] - x[2] * bs for x in rows) / n, sum(x[3] for x in rows) / n)
    none, b_none = cap(sum(x[0] for x in rows) / n, sum(x[4] for x in rows) / n)
    return dict(ideal_req_s=ideal, no_cache_req_s=none, batch_ideal=b_ideal, batch_no_cache=b_none,
                mean_output=out, mean_prompt=sum(x[0] for x in rows) / n,
                ideal_hit_rate=sum(x[2] * bs for x in rows) / max(1, sum(x[0] for x in rows)))
