"""One page-need rule: the engine scheduler's reservation for a waiting request, the router policy's estimate
from a worker's report, and the simulator's admission agree on random requests and prefix-sharing states."""

from hypothesis import given, settings
from hypothesis import strategies as st

from zipserve.scheduler.baselines import RoundRobinPolicy
from zipserve.scheduler.policy import RouteRequest
from zipserve.scheduler.router import worker_state_from_stats
from zipserve.scheduler.simulate import Simulator, WorkerConfig
from zipserve.workers.block_manager import BlockManager
from zipserve.workers.pages import page_hashes
from zipserve.workers.sampling_params import SamplingParams
from zipserve.workers.scheduler import Scheduler
from zipserve.workers.sequence import Sequence


def _seq(rid: str, ids: list[int], max_tokens: int, budget: int | None, arrival: int) -> Sequence:
    return Sequence(rid, list(ids), len(ids), SamplingParams(max_tokens=max_tokens), arrival, budget_blocks=budget)


@st.composite
def _cases(draw):
    bs = draw(st.sampled_from([2, 4, 8]))
    budget = draw(st.one_of(st.none(), st.integers(1, 6)))
    prefix = draw(st.lists(st.integers(0, 50), min_size=0, max_size=6 * bs))
    holders = draw(st.lists(st.tuples(st.integers(0, 3 * bs), st.booleans()), max_size=3))  # (suffix, finished)
    suffix = draw(st.integers(0, 4 * bs))
    max_tokens = draw(st.integers(1, 12 * bs))
    return bs, budget, prefix, holders, suffix, max_tokens


@settings(max_examples=300, deadline=None)
@given(_cases())
def test_engine_router_and_simulator_agree_on_a_requests_page_need(case):
    bs, budget, prefix, holders, suffix, max_tokens = case
    bm = BlockManager(num_blocks=200, block_size=bs)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10_000)
    for i, (extra, finished) in enumerate(holders):  # requests that read the prefix: running or done
        s = _seq(f"h{i}", prefix + [100 + i] * (extra + 1), 4, budget, i)
        sched.add(s)
        sched.schedule()
        s.num_computed_tokens = s.num_tokens  # its prompt ran
        bm.commit_full_blocks(s)
        if finished:
            sched.finish(s)
    new = _seq("new", prefix + [200] * (suffix + 1), max_tokens, budget, len(holders))
    cached = bm.cached_prefix(new)
    engine_need = sched.admission_pages(new, cached)

    every, unheld, held_once = bm.cached_hashes()
    report = {"block_size": bs, "total_pages": bm.num_blocks, "free_pages": bm.num_free_blocks, "max_slots": 8,
              "budget_blocks": budget, "cached": [h.hex() for h in every], "unheld": [h.hex() for h in unheld],
              "held_once": [h.hex() for h in held_once]}
    worker = worker_state_from_stats("w", report)
    req = RouteRequest(new.num_tokens, tuple(page_hashes(new.token_ids, bs)), max_tokens, budget)
    hits = worker.hit_pages(req)
    assert hits == len(cached)
    assert worker.peak_pages(req, hits) == engine_need

    sim_worker = Simulator([], RoundRobinPolicy(), n_workers=1,
                           worker=WorkerConfig(total_pages=200, block_size=bs, budget_blocks=budget)).workers[0]
    hit_hashes = list(req.page_hashes[:hits])
    holders_of = {h: bm.ref_count[b] for h, b in bm.hash_to_block.items()}  # the oracle's view of the pool
    sim_worker.pool.ref.update({h: holders_of[h] for h in hit_hashes})
    assert sim_worker.admission_need(new.num_tokens, max_tokens, hit_hashes) == engine_need
