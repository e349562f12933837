"""Page-pool invariants under random workloads (hypothesis), driving the scheduler with no model."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zipserve.workers.block_manager import BlockManager
from zipserve.workers.pages import page_hashes
from zipserve.workers.sampling_params import SamplingParams
from zipserve.workers.scheduler import Scheduler
from zipserve.workers.sequence import Sequence, Status


def _fake_step(sched: Scheduler, bm: BlockManager, max_tokens: dict) -> list[Sequence]:
    """Execute a scheduled step as the engine does, with a deterministic 'model'."""
    out = sched.schedule()
    finished = []
    for c in out.chunks:
        samples = c.samples
        c.seq.num_computed_tokens += c.num_new_tokens
        bm.commit_full_blocks(c.seq)
        if samples:
            c.seq.token_ids.append((c.seq.token_ids[-1] * 7 + 3) % 50)  # depends only on the sequence
            if c.seq.num_output_tokens >= max_tokens[c.seq.request_id]:
                sched.finish(c.seq)
                finished.append(c.seq)
    return finished


def _live(sched):
    return sched.running + list(sched.waiting)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 60), st.integers(1, 40), st.integers(0, 3)),
        st.tuples(st.just("step"), st.integers(1, 4)),
        st.tuples(st.just("abort"), st.integers(0, 50)),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, block_size=st.sampled_from([2, 4, 8]), num_blocks=st.integers(30, 60),
       budget=st.integers(1, 48), prefix=st.booleans(), headroom=st.sampled_from([0, 4, 128]))
def test_pool_invariants_random_workload(ops, block_size, num_blocks, budget, prefix, headroom):
    bm = BlockManager(num_blocks, block_size, enable_prefix_cache=prefix)
    sched = Scheduler(bm, max_num_seqs=6, max_num_batched_tokens=budget, headroom_steps=headroom)
    max_tokens, seqs, n, aborted = {}, [], 0, set()
    shared = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    for op in ops:
        if op[0] == "add":
            _, plen, mt, family = op
            plen = min(plen, num_blocks * block_size - mt - 1)  # each request must fit the pool alone
            if plen < 1:
                continue
            prompt = (shared[: family * 4] + [100 + (n * 31 + i) % 97 for i in range(plen)])[:plen]
            s = Sequence(f"s{n}", prompt, len(prompt), SamplingParams(max_tokens=mt), n)
            max_tokens[s.request_id] = mt
            seqs.append(s)
            sched.add(s)
            n += 1
        elif op[0] == "step":
            for _ in range(op[1]):
                _fake_step(sched, bm, max_tokens)
                bm.check_invariants(_live(sched))
        else:
            live = [s for s in seqs if s.status is not Status.FINISHED]
            if live:
                victim = live[op[1] % len(live)]
                sched.finish(victim)
                aborted.add(victim.request_id)
        bm.check_invariants(_live(sched))
        for s in sched.running:
            assert len(s.block_table) == -(-s.num_computed_tokens // block_size) or s.num_computed_tokens == 0 or \
                len(s.block_table) * block_size >= s.num_computed_tokens
    # Everything runs to completion (no hang), then every page is free again.
    for _ in range(10_000):
        if not sched.has_work():
            break
        _fake_step(sched, bm, max_tokens)
    assert not sched.has_work(), "scheduler stopped making progress"
    bm.check_invariants([])
    assert bm.num_free_blocks == num_blocks
    # Every request that was not aborted produced exactly its max_tokens.
    assert all(s.num_output_tokens == max_tokens[s.request_id] for s in seqs if s.request_id not in aborted)


def test_page_hashes_chain():
    a = page_hashes(list(range(10)), 4)
    b = page_hashes(list(range(8)) + [99, 98], 4)
    c = page_hashes([0, 1, 2, 3, 9, 5, 6, 7], 4)
    assert len(a) == 2 and a == b  # only full pages are hashed
    assert a[0] == c[0] and a[1] != c[1]  # a change in page 1 changes its hash, not page 0's
    d = page_hashes([4, 5, 6, 7], 4)
    assert d[0] != a[1]  # same tokens, different parent


def test_free_twice_is_caught():
    bm = BlockManager(8, 4)
    s = Sequence("x", [1, 2, 3, 4, 5], 5, SamplingParams(), 0)
    bm.allocate(s, [], 5)
    table = list(s.block_table)
    bm.free(s)
    s.block_table = table
    try:
        bm.free(s)
    except AssertionError:
        return
    raise AssertionError("double free went unnoticed")



@pytest.mark.parametrize("prompt_tokens", [24, 8], ids=["long prompt", "preempted after 16 tokens"])
def test_full_kv_admission_waits_until_the_whole_known_sequence_fits(prompt_tokens):
    """A full-KV request is admitted only once its whole known sequence fits the free pages (its prompt, and
    after a preemption everything it recomputes), not just its first chunk: admitted on its first chunk, it
    would find the pool taken by the running requests' growth part-way through its prefill and be preempted
    again, its work lost."""
    bm = BlockManager(10, 4, enable_prefix_cache=False)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=4)  # a page of prefill per step
    runner = Sequence("run", list(range(1, 21)), 20, SamplingParams(max_tokens=20), 0)  # 5 pages, then grows
    sched.add(runner)
    for _ in range(5):
        _fake_step(sched, bm, {"run": 20})
    assert runner.num_output_tokens == 1 and bm.num_free_blocks == 5
    # 24 known tokens (6 pages) either way; a preempted one carries 16 of them as output
    waiting = Sequence("w", list(range(30, 54)), prompt_tokens, SamplingParams(max_tokens=20), 1)
    sched.add(waiting)
    out = sched.schedule()  # the runner takes its 6th page: 4 free, enough for a first chunk, not for 6 pages
    assert [c.seq for c in out.chunks] == [runner] and waiting.status is Status.WAITING
    sched.finish(runner)
    out = sched.schedule()
    assert [(c.seq, c.num_new_tokens) for c in out.chunks] == [(waiting, 4)]
    bm.check_invariants(_live(sched))


@pytest.mark.parametrize("headroom_steps, pages, admitted", [
    (8, 90, True), (8, 91, False),  # 2 running + the newcomer, x 8 steps = 24 tokens = 6 pages kept free
    (0, 96, True), (0, 97, False),  # no headroom: what the request alone needs
    (1000, 86, True), (1000, 87, False),  # capped at 5% of the pool (10 of 200 pages)
])
def test_full_kv_admission_keeps_growth_headroom(headroom_steps, pages, admitted):
    """A full-KV admission leaves free pages for the running requests' next steps of growth, so that it does
    not make the pool run out a few steps later (and the newcomer be preempted, its prefill lost)."""
    bm = BlockManager(200, 4, enable_prefix_cache=False)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=1000, headroom_steps=headroom_steps)
    a = Sequence("a", [5] * 400, 400, SamplingParams(max_tokens=50), 0)
    b = Sequence("b", [6] * 8, 8, SamplingParams(max_tokens=50), 1)
    sched.add(a)
    sched.add(b)
    for _ in range(2):
        _fake_step(sched, bm, {"a": 50, "b": 50})
    assert bm.num_free_blocks == 96 and a.kv_len == 401 and b.kv_len == 9  # no page needed next step
    w = Sequence("w", [7] * (4 * pages), 4 * pages, SamplingParams(max_tokens=5), 2)
    sched.add(w)
    out = sched.schedule()
    assert (w.status is Status.RUNNING) == admitted
    assert len(out.chunks) == 2 + admitted
    bm.check_invariants(_live(sched))
