"""Which worker serves a request: compressed-page capacity first, prefix affinity when it pays.

Pure Python (no Ray, no CUDA), so it is unit-tested and simulated (scheduler/simulate.py) as is.

The capacity model. Under Compressed PagedAttention a request never holds more than budget + 1 pages
once its prompt is in, so its *peak* page need is known before it starts (as in the engine's
scheduler, one function for both: workers/pages.admission_pages): pages(P + max_tokens) if that is
at most B + 1 pages, else max(pages(P), B + 1), minus the pages a cached prefix supplies, plus what
those hits cost the pool (free cached pages taken, pages another holder must then privatise). A
worker's capacity in requests is therefore known up front: total_pages // (B + 1) in steady state.
Full-KV engines cannot say this, since their requests grow; that is why their routers balance on
request counts and hotspot.

For every worker w the policy computes, in seconds:

    hits_w    = leading pages of the prompt that w holds (chained hashes: a page only counts if
                every page before it matches too), from what the worker reports it holds
    need_w    = peak pages of the request on w (its own budget, or w's), minus hits_w
    admits_w  = w has need_w unreserved free pages and a free slot, after the requests this router
                sent it that w has not reported yet (in-flight)
    prefill_w = (P - hits_w * page) / prefill_tokens_per_s        the work a cached prefix saves
    queue_w   = 0 if admits_w else
                (waiting_w + in_flight_w + 1) * mean_service_s / capacity_w
                (requests ahead of it over w's departure rate: capacity / mean request lifetime)
    load_w    = (running_w + waiting_w + in_flight_w) / capacity_w   (utilisation by compressed capacity)
    n_w       = running_w + in_flight_w                       (requests already in w's batch)
    cost_w    = prefill_w * (1 + externality * n_w) + queue_w + balance_s * load_w * (1 + externality)

and picks the cheapest worker among those that admit the request now (rule 1: never a worker that
cannot admit it when another can); if none admits it, the cheapest overall (its queue term ranks
them). Costs within `tie_tolerance` of the best are tied and one is drawn at random.

Knobs: `prefill_tokens_per_s` (the worker's prefill speed: how much a cached token is worth),
`mean_service_s` (a request's expected lifetime, for the queue estimate), `balance_s` (seconds a
fully loaded worker costs each new request: decode batches slow down with load; this term is what keeps
a prefix everyone shares from becoming a hotspot: once the holder's extra load outweighs the prefill
it saves, requests go elsewhere and warm that worker's cache too), `externality`, `tie_tolerance`.

`externality` (default 1: count it fully; 0: the new request's own latency only) adds the delay a choice
imposes on the requests already running on w. An engine step runs every decoder's token and the prefill
chunks together, so the prefill_w seconds computed on w stall each of its n_w decoders too (hence
prefill_w * (1 + n_w)); and the new request slows each decode step of w's batch about as much as the
batch slows it (hence the load term twice). The sum is the total latency the choice adds on w. With it,
a cached prefix is worth more on a busy worker than on an idle one (re-computing it there stalls more
requests), which keeps multi-turn sessions with their cache; the balance term still grows with load, so
a prefix everyone shares still spreads (tested).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from zipserve.workers.pages import admission_pages, num_pages


@dataclass(frozen=True)
class RouteRequest:
    num_prompt_tokens: int
    page_hashes: tuple = ()  # chained hashes of the prompt's full pages (workers/pages.page_hashes)
    max_tokens: int = 256
    budget_blocks: int | None = None  # None: the worker's own budget


@dataclass
class WorkerState:
    """What a worker reports (plus `in_flight*`, which the router adds from its own bookkeeping)."""

    worker_id: str
    block_size: int
    total_pages: int
    free_pages: int  # free pages nobody has reserved
    max_slots: int
    running: int = 0
    waiting: int = 0
    budget_blocks: int | None = None  # None: full KV
    cached: frozenset = frozenset()  # hashes of the pages it holds intact (prompt and generated pages)
    healthy: bool = True  # False while draining or unhealthy: never chosen
    timestamp: float = 0.0
    in_flight: int = 0  # sent by this router, not yet visible in the worker's report
    in_flight_pages: int = 0
    unheld: frozenset = frozenset()  # cached pages no request holds (free, still cached)
    held_once: frozenset = frozenset()  # cached pages exactly one request holds

    def hit_pages(self, req: RouteRequest) -> int:
        """Leading prompt pages held here, at most (P - 1) // page: the engine always computes the last
        prompt token, so a prompt made only of cached pages still prefills its last page."""
        n = 0
        for h in req.page_hashes[: max(0, req.num_prompt_tokens - 1) // self.block_size]:
            if h not in self.cached:
                break
            n += 1
        return n

    def peak_pages(self, req: RouteRequest, hits: int) -> int:
        """Free pages `req` needs here to be sure of finishing, with `hits` leading prompt pages cached:
        the engine scheduler's reservation (workers/pages.admission_pages)."""
        B = req.budget_blocks if req.budget_blocks is not None else self.budget_blocks
        hit = req.page_hashes[:hits]
        unheld = sum(1 for h in hit if h in self.unheld)
        held_once = sum(1 for h in hit if h in self.held_once)
        return admission_pages(req.num_prompt_tokens, req.num_prompt_tokens + req.max_tokens, self.block_size, B,
                               hits, unheld, held_once)

    def capacity(self, req: RouteRequest) -> int:
        """Requests like `req` this worker holds at once in steady state (a compressed request settles at
        budget + 1 pages whatever its prompt), at most its slots."""
        B = req.budget_blocks if req.budget_blocks is not None else self.budget_blocks
        steady = num_pages(req.num_prompt_tokens + req.max_tokens, self.block_size)
        if B is not None:
            steady = min(steady, B + 1)
        return max(1, min(self.max_slots, self.total_pages // max(1, steady)))


@dataclass
class Decision:
    worker_id: str | None
    cost: float = 0.0
    hit_pages: int = 0
    admits: bool = False
    costs: dict = field(default_factory=dict)


class CapacityAffinityPolicy:
    def __init__(self, prefill_tokens_per_s: float = 20000.0, mean_service_s: float = 60.0, balance_s: float = 1.0,
                 tie_tolerance: float = 1e-3, seed: int | None = None, externality: float = 1.0):
        for name, v in (("prefill_tokens_per_s", prefill_tokens_per_s), ("mean_service_s", mean_service_s)):
            if not v > 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        if balance_s < 0 or tie_tolerance < 0 or externality < 0:
            raise ValueError("balance_s, tie_tolerance and externality must be >= 0")
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.mean_service_s = mean_service_s
        self.balance_s = balance_s
        self.tie_tolerance = tie_tolerance
        self.externality = externality
        self.rng = random.Random(seed)

    def evaluate(self, req: RouteRequest, w: WorkerState) -> tuple[float, bool, int, int]:
        """(cost, admits now, hit pages, pages needed) of sending `req` to `w`."""
        hits = w.hit_pages(req)
        need = w.peak_pages(req, hits)
        admits = (w.free_pages - w.in_flight_pages >= need) and (w.running + w.in_flight < w.max_slots)
        cap = w.capacity(req)
        prefill = max(0, req.num_prompt_tokens - hits * w.block_size) / self.prefill_tokens_per_s
        queue = 0.0 if admits else (w.waiting + w.in_flight + 1) * self.mean_service_s / cap
        load = (w.running + w.waiting + w.in_flight) / cap
        x = self.externality
        cost = prefill * (1 + x * (w.running + w.in_flight)) + queue + self.balance_s * load * (1 + x)
        return cost, admits, hits, need

    def choose(self, req: RouteRequest, workers: list[WorkerState]) -> Decision:
        scored = [(w, *self.evaluate(req, w)) for w in workers if w.healthy]
        if not scored:
            return Decision(None)
        pool = [s for s in scored if s[2]] or scored  # workers that admit it now, if any
        best = min(s[1] for s in pool)
        tied = [s for s in pool if s[1] <= best + self.tie_tolerance * max(1.0, abs(best))]
        w, cost, admits, hits, _ = self.rng.choice(tied)
        return Decision(w.worker_id, cost, hits, admits, {s[0].worker_id: s[1] for s in scored})
