"""Rules of the routing policy (scheduler/policy.py), on hand-made worker states."""

from collections import Counter

import pytest

from zipserve.scheduler.policy import CapacityAffinityPolicy, RouteRequest, WorkerState
from zipserve.scheduler.router import route_request_from, route_request_to_dict, worker_state_from_stats
from zipserve.workers.pages import page_hashes

BS = 16
SYSTEM = list(range(1, 1 + 8 * BS))  # an 8-page system prompt


def _req(prompt, max_tokens=2000, budget=None):
    return RouteRequest(len(prompt), tuple(page_hashes(prompt, BS)), max_tokens, budget)


def _worker(name, free=400, total=400, running=0, waiting=0, cached=(), budget=8, slots=64, healthy=True):
    return WorkerState(name, BS, total, free, slots, running, waiting, budget, frozenset(cached), healthy)


def test_capacity_first():
    """A worker that cannot admit the request is never chosen while another can, whatever its cache."""
    p = SYSTEM + [500, 501]
    req = _req(p)
    full = _worker("full", free=3, running=40, cached=page_hashes(p, BS))  # holds the prefix, no room
    empty = _worker("empty", running=50)
    pol = CapacityAffinityPolicy(seed=0)
    assert all(pol.choose(req, [full, empty]).worker_id == "empty" for _ in range(20))
    no_slot = _worker("noslot", running=64, slots=64, cached=page_hashes(p, BS))
    assert pol.choose(req, [no_slot, empty]).worker_id == "empty"


def test_affinity_when_it_pays_and_not_when_it_does_not():
    long_prompt = list(range(1, 1 + 200 * BS)) + [7]  # 3200 cached tokens: 0.16 s of prefill saved
    req = _req(long_prompt)
    holder = _worker("holder", running=10, cached=page_hashes(long_prompt, BS))
    other = _worker("other", running=8)
    pol = CapacityAffinityPolicy(prefill_tokens_per_s=20000, balance_s=1.0, seed=0)
    assert pol.choose(req, [holder, other]).worker_id == "holder"
    busy_holder = _worker("holder", running=40, cached=page_hashes(long_prompt, BS))  # far more loaded
    assert pol.choose(req, [busy_holder, other]).worker_id == "other"


def test_externality_a_cached_prefix_is_worth_more_on_a_busy_worker():
    """Re-computing a prefix on a worker stalls every request running there, so with `externality` the
    busy holder keeps the request that the request's own latency alone (externality 0) would send away."""
    prompt = list(range(1, 1 + 100 * BS)) + [7]  # 1600 cached tokens: 0.08 s of prefill saved
    req = _req(prompt)
    holder = _worker("holder", total=2000, free=2000, slots=256, running=120, cached=page_hashes(prompt, BS))
    other = _worker("other", total=2000, free=2000, slots=256, running=60)
    own_only = CapacityAffinityPolicy(prefill_tokens_per_s=20000, balance_s=1.0, externality=0.0, seed=0)
    assert all(own_only.choose(req, [holder, other]).worker_id == "other" for _ in range(10))
    total = CapacityAffinityPolicy(prefill_tokens_per_s=20000, balance_s=1.0, seed=0)  # externality 1
    assert all(total.choose(req, [holder, other]).worker_id == "holder" for _ in range(10))
    d = total.choose(req, [holder, other])
    # holder: (1 token / 20000) x 121 + 2 x 120/222; other: (1601 / 20000) x 61 + 2 x 60/222
    assert d.costs["holder"] == pytest.approx(121 / 20000 + 2 * 120 / 222)
    assert d.costs["other"] == pytest.approx(1601 / 20000 * 61 + 2 * 60 / 222)
    # a far more loaded holder still loses: the load term counts twice too
    crowded = _worker("holder", total=2000, free=2000, slots=256, running=220, cached=page_hashes(prompt, BS))
    idle = _worker("other", total=2000, free=2000, slots=256, running=0)
    assert total.choose(req, [crowded, idle]).worker_id == "other"


def test_only_pages_the_worker_still_holds_count():
    p = SYSTEM + [9, 9, 9]
    hashes = page_hashes(p, BS)
    req = _req(p)
    gap = _worker("gap", cached=hashes[:2] + hashes[3:])  # page 2 evicted: later pages are no prefix hit
    assert gap.hit_pages(req) == 2
    assert _worker("all", cached=hashes).hit_pages(req) == len(hashes)


def test_no_hotspot_when_everyone_shares_a_prefix():
    """Route 400 requests sharing one system prompt to 4 workers, updating their state as they land:
    the prefix holder must not take them all; load stays balanced by capacity."""
    pol = CapacityAffinityPolicy(seed=1)
    workers = [_worker(f"w{i}") for i in range(4)]
    for i in range(400):
        req = _req(SYSTEM + [1000 + i, 2000 + i])
        d = pol.choose(req, workers)
        w = next(w for w in workers if w.worker_id == d.worker_id)
        need = w.peak_pages(req, w.hit_pages(req))
        w.running += 1
        w.free_pages -= need
        w.cached = w.cached | frozenset(req.page_hashes)
        if i % 10 == 9:  # requests finish over time
            for x in workers:
                if x.running:
                    x.running -= 1
                    x.free_pages += 9
    loads = [w.running for w in workers]
    assert max(loads) <= 1.2 * (sum(loads) / len(loads)) + 1


def test_ties_are_broken_randomly():
    pol = CapacityAffinityPolicy(seed=3)
    workers = [_worker(f"w{i}") for i in range(4)]
    picks = Counter(pol.choose(_req([1, 2, 3]), workers).worker_id for _ in range(400))
    assert len(picks) == 4 and min(picks.values()) > 50


def test_stale_state_plus_in_flight_spreads_a_burst():
    """Reports lag; the router's in-flight counts keep a burst from piling onto one 'empty' worker."""
    pol = CapacityAffinityPolicy(seed=0)
    a, b = _worker("a", free=20, total=400), _worker("b", free=400)
    req = _req(list(range(50)), max_tokens=100)
    a.in_flight, a.in_flight_pages = 5, 20  # five requests sent to a since its last report
    assert pol.choose(req, [a, b]).worker_id == "b"


def test_unhealthy_worker_never_chosen_and_queueing_when_all_full():
    pol = CapacityAffinityPolicy(seed=0)
    req = _req(SYSTEM)
    sick = _worker("sick", healthy=False)
    assert pol.choose(req, [sick]).worker_id is None
    full_short_queue = _worker("short", free=0, running=44, waiting=1)
    full_long_queue = _worker("long", free=0, running=44, waiting=30)
    assert pol.choose(req, [full_long_queue, full_short_queue, sick]).worker_id == "short"


def test_compressed_capacity_model():
    w = _worker("w", budget=8)
    assert w.peak_pages(_req([1] * 100, max_tokens=10), 0) == 7  # short: never compresses
    assert w.peak_pages(_req([1] * 100, max_tokens=30000), 0) == 9  # budget + 1
    assert w.peak_pages(_req([1] * 4000, max_tokens=30000), 0) == 250  # long prompt, until compressed
    assert w.capacity(_req([1] * 100, max_tokens=30000)) == min(64, 400 // 9)
    assert w.peak_pages(_req([1] * 20, max_tokens=30000, budget=2), 0) == 3  # per-request budget
    assert w.peak_pages(_req([1] * 100, max_tokens=30000, budget=2), 0) == 7  # its prompt, until compressed
    assert w.capacity(_req([1] * 4000, max_tokens=30000)) == 400 // 9  # steady state, not the prompt's peak


def test_wire_format_round_trip():
    req = _req(SYSTEM + [3])
    assert route_request_from(route_request_to_dict(req)) == req
    st = worker_state_from_stats("x", {"block_size": 16, "total_pages": 10, "free_pages": 5, "max_slots": 4,
                                       "cached": [h.hex() for h in req.page_hashes], "timestamp": 1.0})
    assert st.hit_pages(req) == len(req.page_hashes)
    assert worker_state_from_stats("x", {}) is None


def test_bad_knobs():
    with pytest.raises(ValueError):
        CapacityAffinityPolicy(prefill_tokens_per_s=0)
    with pytest.raises(ValueError):
        CapacityAffinityPolicy(balance_s=-1)
    with pytest.raises(ValueError):
        CapacityAffinityPolicy(externality=-1)
