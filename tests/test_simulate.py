"""The routing simulator (scheduler/simulate.py) and the baseline policies (scheduler/baselines.py)."""

import pytest

from zipserve.scheduler.baselines import (DynamoCostPolicy, PowerOfTwoPolicy, RayPrefixAffinityPolicy, RoundRobinPolicy,
                                 SGLangCacheAwarePolicy)
from zipserve.scheduler.policy import CapacityAffinityPolicy, WorkerState
from zipserve.scheduler.simulate import (CostModel, SimRouteRequest, Simulator, TraceRequest, WorkerConfig,
                                        estimate_capacity)
from zipserve.scheduler.traces import chat_trace, math_trace, skewed_trace
from zipserve.workers.pages import page_hashes

SMALL = WorkerConfig(total_pages=120, block_size=16, budget_blocks=4, max_slots=8, max_batched_tokens=256)


def _policies():
    return [RoundRobinPolicy(seed=1), PowerOfTwoPolicy(seed=1), SGLangCacheAwarePolicy(seed=1),
            RayPrefixAffinityPolicy(seed=1), DynamoCostPolicy(seed=1), CapacityAffinityPolicy(seed=1)]


def _mixed_trace():
    """Chat turns (continuations, no compression for short ones), long compressing requests, a shared prefix."""
    chat = chat_trace(n_sessions=6, rate=8.0, seed=3, n_system=2, system_tokens=(40, 70), turns=(1, 4),
                      user_tokens=(5, 30), output_tokens=(5, 60), max_tokens=80, think_s=0.2)
    maths = math_trace(n_problems=3, rate=8.0, seed=4, samples=4, system_tokens=20, problem_tokens=(10, 60),
                       output_tokens=(60, 200), max_tokens=200)
    trace = list(chat)
    for r in maths:
        r.rid += len(chat)
        trace.append(r)
    return trace


# ---- the simulator ------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", _policies(), ids=lambda p: getattr(p, "name", "ours"))
def test_conservation_pages_and_hits(policy):
    """Every request completes exactly once; the pool's invariants hold after every step (pages never
    exceed the pool, ref counts match the tables, reservations add up); hits only on pages that exist."""
    trace = _mixed_trace()
    sim = Simulator(trace, policy, n_workers=3, worker=SMALL, report_interval_s=0.05, check=True)
    res = sim.run()
    assert res["requests"] == len(trace)
    assert sorted(sim.finish) == sorted(r.rid for r in trace)
    assert res["output_tokens"] == sum(r.output_len for r in trace)
    assert res["compressions"] > 0  # the long ones compressed
    assert all(max(used) <= SMALL.total_pages for _, _, used in sim.samples)
    for rec in sim.records:
        req = sim.reqs[rec["rid"]]
        assert rec["hits"] % SMALL.block_size == 0 and rec["hits"] <= len(req.prompt) - 1
        assert rec["arrival"] <= rec["admit"] <= rec["first_token"] <= rec["finish"]
    assert res["prefill_tokens"] == res["prompt_tokens"] - res["hit_tokens"]
    for w in sim.workers:
        assert not w.running and not w.waiting and w.outstanding == 0
        assert w.pool.num_free == SMALL.total_pages  # everything freed (cached pages are free)


def _req(rid, prompt, out, t=0.0, answer=None, after=None):
    return TraceRequest(rid, t, prompt, out, max(out, 64), answer=answer, after=after)


def test_prefix_hits_eviction_and_compression_sparing():
    """One worker: a repeated prompt hits its full pages (all but the last token's page); a chat follow-up
    hits the answer's pages too; a compressed request's prompt pages stay cached when the pool has room;
    a different prompt hits nothing."""
    cfg = WorkerConfig(total_pages=64, block_size=16, budget_blocks=2, max_slots=4, max_batched_tokens=512)
    a = list(range(100, 140))  # 40 tokens: 2 full pages
    ans = list(range(1000, 1010))
    trace = [
        _req(0, a, 10, 0.0, answer=ans),  # compresses when its cache holds 48 entries (3 full pages)
        _req(1, a, 5, 5.0),  # same prompt later: 2 full pages, both hit ((40 - 1) // 16 = 2)
        _req(2, a + ans + [7, 8], 3, 6.0),  # prompt + answer + more: pages of the first request's cache
        _req(3, list(range(500, 540)), 3, 7.0),  # a different prompt
    ]
    sim = Simulator(trace, RoundRobinPolicy(), n_workers=1, worker=cfg, check=True)
    sim.run()
    hits = {r["rid"]: r["hits"] for r in sim.records}
    assert hits[0] == 0 and hits[1] == 32 and hits[3] == 0
    # Request 0 compressed when its cache reached 3 full pages (48 tokens) with room to spare: its 3 hashed
    # pages (2 prompt pages + 1 holding prompt tail and answer start) were released still cached.
    assert hits[2] == 48
    # Request 2's 52-token prompt compresses when its prefill ends: its partial page is reused, 2 of its 3
    # cached pages are spared (fresh pages instead).
    assert sim.workers[0].stats["compressions"] == 2 and sim.workers[0].stats["spared_pages"] == 3 + 2


@pytest.mark.parametrize("total_pages,survives", [(9, True), (7, False)])
def test_compression_under_memory_pressure(total_pages, survives):
    """Request 2's prompt takes a cached 3-page prefix nobody holds (its pages become its own, so it
    reserves only the one page it still needs) and compresses when its prefill ends. It spares the cached
    pages (fresh pages instead) only with pages nobody reserved: with 9 pages there are two, and the next
    reader hits the prefix; with 7 there are none, it overwrites the prefix and the next reader misses."""
    cfg = WorkerConfig(total_pages=total_pages, block_size=16, budget_blocks=2, max_slots=4, max_batched_tokens=512)
    x = list(range(100, 148))  # 3 full pages
    trace = [TraceRequest(0, 0.0, x + [1, 2], 1, 5),  # leaves x cached
             TraceRequest(1, 1.0, list(range(300, 316)), 10, 32),  # still running later; reserves 3 pages
             TraceRequest(2, 1.0, x + [3, 4], 5, 5),  # hits x, reserves 1 page, compresses after its prefill
             TraceRequest(3, 5.0, x + [5, 6], 1, 5)]
    sim = Simulator(trace, RoundRobinPolicy(), n_workers=1, worker=cfg, check=True)
    sim.run()
    hits = {r["rid"]: r["hits"] for r in sim.records}
    assert hits[2] == 48 and sim.workers[0].stats["compressions"] == 1
    assert hits[3] == (48 if survives else 0)
    assert sim.workers[0].stats["spared_pages"] == (2 if survives else 0)


def test_eviction_under_pressure():
    """A tiny pool: later unrelated requests pop the LRU cached pages, so the repeat misses."""
    cfg = WorkerConfig(total_pages=8, block_size=16, budget_blocks=None, max_slots=4, max_batched_tokens=512)
    a = list(range(100, 164))  # 4 pages
    trace = [_req(0, a, 2, 0.0), _req(1, list(range(300, 364)), 60, 1.0), _req(2, a, 2, 30.0)]
    for r in trace:
        r.max_tokens = r.output_len
    sim = Simulator(trace, RoundRobinPolicy(), n_workers=1, worker=cfg, check=True)
    sim.run()
    assert {r["rid"]: r["hits"] for r in sim.records}[2] == 0


def test_reservation_blocks_admission():
    """A request whose peak pages do not fit waits (FCFS) until pages free up; slots are never exceeded."""
    cfg = WorkerConfig(total_pages=10, block_size=16, budget_blocks=4, max_slots=4, max_batched_tokens=512)
    trace = [_req(i, [i] * 20 + list(range(200, 220)), 100, 0.0) for i in range(3)]  # peak 5 pages each
    sim = Simulator(trace, RoundRobinPolicy(), n_workers=1, worker=cfg, check=True)
    sim.run()
    rec = sorted(sim.records, key=lambda r: r["rid"])
    assert rec[0]["admit"] == rec[1]["admit"] == 0.0  # arrivals at one instant share the first step
    assert rec[2]["admit"] > 0 and rec[2]["admit"] == pytest.approx(min(rec[0]["finish"], rec[1]["finish"]))


def test_step_cost_model():
    """One request alone: TTFT = one prefill step; each further token one decode step."""
    cost = CostModel(t_fixed_s=0.01, t_decode_s=0.001, t_prefill_s=0.0001)
    cfg = WorkerConfig(total_pages=64, block_size=16, budget_blocks=None, max_slots=4, max_batched_tokens=64)
    trace = [_req(0, list(range(100)), 5, 0.0)]  # 100-token prompt: chunks of 64 + 36
    sim = Simulator(trace, RoundRobinPolicy(), n_workers=1, worker=cfg, cost=cost)
    sim.run()
    r = sim.records[0]
    assert r["first_token"] == pytest.approx(0.01 + 64e-4 + 0.01 + 36e-4)
    assert r["finish"] - r["first_token"] == pytest.approx(4 * 0.011)


def test_deterministic_under_seed():
    def once():
        trace = skewed_trace(n=60, rate=30.0, seed=7, prefix_tokens=64, suffix_tokens=(5, 20),
                             other_tokens=(20, 80), output_tokens=(10, 60), max_tokens=64)
        res = Simulator(trace, CapacityAffinityPolicy(seed=5), n_workers=3, worker=SMALL).run()
        res.pop("sim_wall_s")
        return res

    assert once() == once()


def test_capacity_estimate_counts_reuse():
    trace = skewed_trace(n=50, rate=1.0, seed=0, prefix_tokens=256, suffix_tokens=(5, 20), other_tokens=(20, 80),
                         output_tokens=(10, 60), max_tokens=64)
    cap = estimate_capacity(trace, 2, SMALL)
    assert cap["ideal_req_s"] > cap["no_cache_req_s"] > 0 and 0.5 < cap["ideal_hit_rate"] < 1


# ---- baselines on hand-made states -------------------------------------------------------------------
BS = 16
SYSTEM = list(range(1, 1 + 8 * BS))


def _rreq(prompt, rid=0, max_tokens=100):
    return SimRouteRequest(num_prompt_tokens=len(prompt), page_hashes=tuple(page_hashes(prompt, BS)),
                           max_tokens=max_tokens, rid=rid, token_ids=prompt)


def _w(name, running=0, waiting=0, in_flight=0, cached=(), free=400):
    return WorkerState(name, BS, 400, free, 64, running, waiting, 8, frozenset(cached), in_flight=in_flight)


def test_round_robin_cycles_over_healthy_workers():
    pol = RoundRobinPolicy()
    ws = [_w("a"), _w("b"), _w("c")]
    assert [pol.choose(_rreq([1, 2]), ws).worker_id for _ in range(6)] == ["a", "b", "c"] * 2
    ws[1].healthy = False
    assert {pol.choose(_rreq([1, 2]), ws).worker_id for _ in range(4)} == {"a", "c"}


def test_pow2_picks_the_shorter_queue_of_two():
    pol = PowerOfTwoPolicy(seed=0)
    ws = [_w("a", running=5), _w("b", running=1, in_flight=1)]
    assert all(pol.choose(_rreq([1]), ws).worker_id == "b" for _ in range(10))
    ws3 = [_w("a", running=9), _w("b", running=9), _w("c", running=0)]
    picks = [pol.choose(_rreq([1]), ws3).worker_id for _ in range(200)]
    assert "c" in picks and picks.count("c") > 100  # c wins whenever sampled (2 pairs of 3)


def _route(pol, req, ws, now=0.0):
    d = pol.choose(req, ws)
    pol.on_routed(req, d.worker_id, now)
    return d.worker_id


def test_sglang_cache_aware_rules():
    pol = SGLangCacheAwarePolicy(seed=0)
    ws = [_w("a"), _w("b")]
    p1 = SYSTEM + [900, 901]
    first = _route(pol, _rreq(p1, 1), ws)
    # Balanced, matching prompt (match rate > 0.3): the worker that saw the prefix.
    assert all(_route(pol, _rreq(SYSTEM + [5, i], 10 + i), ws) == first for i in range(5))
    # A miss: the worker with the smallest tree (the other one).
    other = "b" if first == "a" else "a"
    assert _route(pol, _rreq(list(range(5000, 5100)), 20), ws) == other
    # Imbalanced (diff > 64 and > 1.5x): the least loaded worker, even for a matching prompt.
    for i in range(70):
        pol.on_routed(_rreq([7000 + i], 100 + i), first, 0.0)
    assert _route(pol, _rreq(SYSTEM + [5, 99], 300), ws) == other
    # Finishing requests rebalances; affinity returns (the exact first prompt: only `first` holds its last page).
    for i in range(70):
        pol.on_finished(None, first, 1.0)
    assert _route(pol, _rreq(p1, 301), ws) == first


def test_ray_prefix_affinity_rules():
    pol = RayPrefixAffinityPolicy(seed=0)
    ws = [_w("a"), _w("b"), _w("c")]
    p = SYSTEM + [900]
    first = _route(pol, _rreq(p, 1), ws)
    # Balanced and matching: the owner of the deepest match.
    assert all(_route(pol, _rreq(SYSTEM + [i], 2 + i), ws) == first for i in range(5))
    # Low match rate: the tenants with the fewest characters (never the one holding everything).
    assert _route(pol, _rreq(list(range(3000, 3100)), 50), ws) != first
    # Imbalanced queues (max - min > 10): power of two, i.e. here the shorter queue of a random pair.
    others = [x for x in "abc" if x != first]
    busy = [_w(first, running=20), _w(others[0], running=20), _w(others[1], running=0)]
    picks = [_route(pol, _rreq(SYSTEM + [7], 60 + i), busy) for i in range(30)]
    assert others[1] in picks and set(picks) != {first}
    # Among matching owners, the shortest queue.
    pol2 = RayPrefixAffinityPolicy(seed=0)
    pol2.tree.add_tenants(["a", "b", "c"], 0.0)
    pol2.tree.insert(pol2.text(_rreq(p)), "a", 1.0)
    pol2.tree.insert(pol2.text(_rreq(p)), "b", 2.0)
    ws2 = [_w("a", running=6), _w("b", running=2), _w("c", running=0)]
    assert pol2.choose(_rreq(p, 9), ws2).worker_id == "b"


def test_dynamo_cost_rules():
    pol = DynamoCostPolicy(seed=0)
    p = SYSTEM + [900, 901]  # 8 full pages + a partial one
    hashes = page_hashes(p, BS)
    ws = [_w("a", cached=hashes[:6]), _w("b")]
    d = pol.choose(_rreq(p, 1), ws)
    # cost = prefill blocks after overlap + new blocks: a = (130 - 96) / 16 + 9, b = 130 / 16 + 9.
    assert d.worker_id == "a"
    assert d.costs["a"] == pytest.approx(34 / 16 + 9) and d.costs["b"] == pytest.approx(130 / 16 + 9)
    pol.on_routed(_rreq(p, 1), "a", 0.0)
    # Its blocks are now active on a (deduplicated for a request sharing them); pending prefill counts.
    d2 = pol.choose(_rreq(p, 2), ws)
    assert d2.costs["a"] == pytest.approx((34 + 34) / 16 + 9)
    pol.on_first_token(_rreq(p, 1), "a", 1.0)
    assert pol.choose(_rreq(p, 3), ws).costs["a"] == pytest.approx(34 / 16 + 9)
    pol.on_finished(_rreq(p, 1), "a", 2.0)
    assert pol.blocks["a"] == {} and pol.prefill["a"] == 0


def test_ours_balances_a_hot_prefix_better_than_cache_aware():
    """On a small skewed trace (90% share one long prefix), our policy spreads the load; SGLang's
    cache_aware piles the hot prefix onto one worker until its imbalance gate trips."""
    cfg = WorkerConfig(total_pages=400, block_size=16, budget_blocks=8, max_slots=32, max_batched_tokens=1024)
    trace = skewed_trace(n=400, rate=40.0, seed=1, prefix_tokens=256, suffix_tokens=(10, 40),
                         other_tokens=(50, 200), output_tokens=(40, 160), max_tokens=160)
    cost = CostModel()
    cap = estimate_capacity(trace, 4, cfg, cost)
    b = cap["batch_ideal"]
    ours = CapacityAffinityPolicy(prefill_tokens_per_s=1 / cost.t_prefill_s,
                                  mean_service_s=cap["mean_output"] * cost.step_s(b, 0),
                                  balance_s=cap["mean_output"] * cost.t_decode_s * (b - 1), seed=0)
    r_ours = Simulator(trace, ours, n_workers=4, worker=cfg, cost=cost).run()
    r_sgl = Simulator(trace, SGLangCacheAwarePolicy(seed=0), n_workers=4, worker=cfg, cost=cost).run()
    assert r_ours["imbalance"] < r_sgl["imbalance"]
    assert r_ours["hit_rate"] >= 0.95 * r_sgl["hit_rate"]


def test_ray_tree_shared_prefix_count_matches_ray():
    """Our faster shared-prefix count inside Ray's PrefixTree gives os.path.commonprefix's answer."""
    import os
    import random

    from zipserve.scheduler.baselines import _ray_prefix_tree

    count = _ray_prefix_tree()._shared_prefix_count
    rng = random.Random(0)
    for _ in range(500):
        a = "".join(rng.choice("ab") for _ in range(rng.randrange(12)))
        b = "".join(rng.choice("ab") for _ in range(rng.randrange(12)))
        assert count(a, b) == len(os.path.commonprefix([a, b]))
