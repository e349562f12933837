"""Compressed PagedAttention in the engine, against the dense reference policy and transformers."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.dense_reference import DenseCompressedReference
from tests.engine_driver import run_checked
from tests.hf_oracle import hf_greedy
from zipserve.workers import LLM, SamplingParams
from zipserve.workers.config import CompressionConfig

SYSTEM = list(range(40, 40 + 17))
PROMPTS = [
    [5, 6, 7, 8, 9],  # short: grows into its budget while decoding
    SYSTEM + [200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212, 213, 214, 215, 216, 217],  # long prompt
    SYSTEM + [150, 151, 152],  # shares the system prompt's pages
    [100 + (i * 7) % 150 for i in range(19)],
]

SCORING = {
    "attention-only": dict(use_global_score=False, use_redundancy=False, use_pooling=False),
    "global": dict(use_redundancy=False, use_pooling=False),
    "global-lightning": dict(use_redundancy=True, use_pooling=False),
    "paper-set": dict(use_redundancy=True, use_pooling=True),
    "all-pairs-sinks": dict(use_redundancy=True, use_pooling=True, lightning_redundancy=False, num_sink_tokens=2),
    "continuous-pooling-w3": dict(use_redundancy=False, use_pooling=True, pooling_width=3, continuous_pooling=True, score_decay=0.5),
    "global-sinks-recent": dict(use_redundancy=False, use_pooling=False, num_sink_tokens=5, recent_window=6),
    "global-sinks-recent-fraction": dict(use_redundancy=False, use_pooling=False, num_sink_tokens=3, recent_fraction=0.6),
    "sliding-window-sinks": dict(use_redundancy=False, use_pooling=False, num_sink_tokens=2, recent_fraction=1.0),
    "global-prompt-recent": dict(use_redundancy=False, use_pooling=False, prompt_fraction=0.5, recent_fraction=0.25),
}

MODELS = {
    "qwen3-gqa2": ("qwen3", dict(heads=4, kv_heads=2)),
    "llama-gqa4": ("llama", dict(heads=4, kv_heads=1)),
    "qwen2-mha": ("qwen2", dict(heads=4, kv_heads=4)),
}

CASES = [  # (model, scoring, block_size, budget, window, max_num_batched_tokens)
    ("qwen3-gqa2", "paper-set", 8, 2, 4, 16),
    ("qwen3-gqa2", "attention-only", 8, 2, 4, 16),
    ("qwen3-gqa2", "global", 4, 3, 2, 7),
    ("qwen3-gqa2", "global-lightning", 8, 1, 8, 64),
    ("qwen3-gqa2", "all-pairs-sinks", 8, 2, 4, 16),
    ("qwen3-gqa2", "continuous-pooling-w3", 4, 4, 3, 9),
    ("qwen3-gqa2", "global-sinks-recent", 4, 3, 2, 9),  # sinks longer than a page, tail longer than the window
    ("qwen3-gqa2", "global-sinks-recent-fraction", 4, 4, 2, 9),  # tail: 0.6 x 16 -> 9 entries
    ("llama-gqa4", "sliding-window-sinks", 4, 3, 2, 9),  # tail: all 12 kept entries less the 2 sinks
    ("qwen3-gqa2", "global-prompt-recent", 4, 4, 2, 9),  # head: a 5-token prompt whole, longer ones their first 8
    ("llama-gqa4", "paper-set", 8, 2, 4, 10),
    ("llama-gqa4", "all-pairs-sinks", 4, 3, 2, 16),
    ("qwen2-mha", "paper-set", 8, 3, 8, 16),
    ("qwen2-mha", "global", 16, 1, 4, 24),
]


@pytest.mark.parametrize("model,scoring,block_size,budget,window,chunk", CASES,
                         ids=[f"{m}-{s}-bs{b}-B{k}-Q{q}" for m, s, b, k, q, _ in CASES])
def test_engine_equals_dense_reference(model_factory, model, scoring, block_size, budget, window, chunk):
    arch, kw = MODELS[model]
    path = model_factory(arch, **kw)
    ccfg = dict(SCORING[scoring], query_window=window)
    max_tokens = 40
    ref = DenseCompressedReference(path, block_size, budget, CompressionConfig(**ccfg))
    expected = [ref.generate(p, max_tokens) for p in PROMPTS]
    llm = LLM(path, block_size=block_size, budget_blocks=budget, compression=ccfg, max_num_batched_tokens=chunk,
              num_blocks=64)
    # The third prompt arrives once the second's system-prompt pages are cached.
    outs = run_checked(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                       arrive_at=[0, 0, 6, 1])
    assert [o.token_ids for o in outs] == expected
    stats = llm.stats()
    assert stats["compressions"] == len(ref.kept_log) > 0
    assert stats["prefix_cache_hits"] > 0  # the shared system prompt was reused
    assert stats["free_pages"] == stats["total_pages"]


def test_compression_changes_outputs_and_bounds_pages(qwen3_path):
    """Sanity that the test above can fail: compressed outputs differ from full KV's."""
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    full = hf_greedy(qwen3_path, PROMPTS, 60)
    peak = {}

    def track(eng):
        for s in eng.scheduler.running:
            peak[s.request_id] = max(peak.get(s.request_id, 0), len(s.block_table))

    llm = LLM(qwen3_path, block_size=8, budget_blocks=2, compression=dict(query_window=4))
    outs = run_checked(llm, PROMPTS, params, track)
    assert any(o.token_ids != f for o, f in zip(outs, full))
    assert max(peak.values()) <= 3 + 3  # the long prompt holds its pages only until the end of its prefill


def test_budget_at_least_length_equals_full_kv(qwen3_path):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    expected = hf_greedy(qwen3_path, PROMPTS, 30)
    llm = LLM(qwen3_path, block_size=8, budget_blocks=10, compression=dict(query_window=4), max_num_batched_tokens=16)
    outs = run_checked(llm, PROMPTS, params)
    assert [o.token_ids for o in outs] == expected
    assert llm.stats()["compressions"] == 0


def test_per_request_budget(qwen3_path):
    """A request's own budget sets its page count and, with a recent fraction, its protected tail (8 of 16
    entries at budget 2, 16 of 32 at budget 4)."""
    ccfg = CompressionConfig(query_window=4, recent_fraction=0.5)
    prompt = PROMPTS[3]
    ref2 = DenseCompressedReference(qwen3_path, 8, 2, ccfg).generate(prompt, 40)
    ref4 = DenseCompressedReference(qwen3_path, 8, 4, ccfg).generate(prompt, 40)
    llm = LLM(qwen3_path, block_size=8, budget_blocks=2, compression=dict(query_window=4, recent_fraction=0.5))
    a, b = llm.generate([prompt, prompt], [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                                           SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, budget_blocks=4)],
                        use_tqdm=False)
    assert a.token_ids == ref2 and b.token_ids == ref4 and ref2 != ref4


@pytest.mark.parametrize("prompt_fraction", [0.5, 0.0])
def test_prompt_fraction_keeps_each_requests_prompt(qwen3_path, prompt_fraction):
    """With prompt_fraction 0.5 every compression keeps, in every layer and KV head, the 5-token prompt whole
    and the first 8 of the 19-token one (half of the 16 kept entries), whatever their scores; without it
    attention scoring drops some of them (the check can fail)."""
    ccfg = dict(query_window=4, recent_fraction=0.25, prompt_fraction=prompt_fraction)
    llm = LLM(qwen3_path, block_size=8, budget_blocks=2, compression=ccfg)
    llm.engine.runner.compressor.kept_log = []
    prompts = {"short": PROMPTS[0], "long": PROMPTS[3]}
    for rid, p in prompts.items():
        llm.engine.add_request(rid, p, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    log = llm.engine.runner.compressor.kept_log
    assert {rid for rid, *_ in log} == set(prompts)
    head = {"short": 5, "long": 8}
    kept_head = all(bool((idx[..., : head[rid]] == torch.arange(head[rid])).all()) for rid, _, _, idx in log)
    assert kept_head == (prompt_fraction > 0)


def test_long_prompt_compressed_at_end_of_chunked_prefill(qwen3_path):
    """A prompt of 9 pages with a budget of 2: chunked prefill, then one compression to 3 pages."""
    prompt = [(i * 11) % 200 + 3 for i in range(70)]
    pages_after_prefill = []

    def watch(eng):
        for s in eng.scheduler.running:
            if s.decoding:
                pages_after_prefill.append(len(s.block_table))

    llm = LLM(qwen3_path, block_size=8, budget_blocks=2, compression=dict(query_window=4), max_num_batched_tokens=12)
    out = run_checked(llm, [prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), watch)[0]
    ref = DenseCompressedReference(qwen3_path, 8, 2, CompressionConfig(query_window=4))
    assert out.token_ids == ref.generate(prompt, 20)
    assert pages_after_prefill and max(pages_after_prefill) == 3
    assert llm.stats()["pages_freed_by_compression"] >= 9 - 3


def test_shared_pages_survive_a_sharers_compression(qwen3_path):
    """B compresses while A still reads the shared prompt pages; later C hits them: all equal reference."""
    ccfg = dict(query_window=4)
    shared = list(range(60, 60 + 24))  # 3 full pages of 8
    a, b = shared + [1], shared + [2]
    llm = LLM(qwen3_path, block_size=8, budget_blocks=3, compression=ccfg)
    ref = DenseCompressedReference(qwen3_path, 8, 3, CompressionConfig(**ccfg))
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)]
    outs = run_checked(llm, [a, b], params)
    assert outs[0].token_ids == ref.generate(a, 6) and outs[1].token_ids == ref.generate(b, 40)
    c = llm.generate([shared + [3]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0]
    assert c.num_cached_tokens == 24
    assert c.token_ids == ref.generate(shared + [3], 30)


def test_scheduling_reserves_budget_and_never_preempts_compressed(qwen3_path):
    """Pool of 14 pages, budget 2 (3 pages each): 4 reserved slots; 2 spare pages let more requests run
    opportunistically (preempted or compressed early when pages run out, never recomputed once compressed)."""
    llm = LLM(qwen3_path, block_size=8, budget_blocks=2, compression=dict(query_window=4), num_blocks=14,
              max_num_batched_tokens=64)
    prompts = [[(i * 5 + j) % 250 + 3 for j in range(6 + i)] for i in range(7)]
    seen = {"max_running": 0, "max_reserved": 0}

    def watch(eng):
        s = eng.stats()
        seen["max_running"] = max(seen["max_running"], s["running"])
        seen["max_reserved"] = max(seen["max_reserved"], s["reserved_requests"])

    outs = run_checked(llm, prompts, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), watch)
    stats = llm.stats()
    assert stats["slots_total"] == 4
    assert seen["max_running"] > 4  # extra requests ran opportunistically (reservations never exceed the pool:
    # check_invariants asserts outstanding reserved pages <= free pages after every step)
    assert all(len(o.token_ids) == 50 for o in outs)
    assert stats["free_pages"] == 14 and stats["slots_free"] == 4
    # Outputs of requests never preempted nor early-compressed equal the reference.
    ref = DenseCompressedReference(qwen3_path, 8, 2, CompressionConfig(query_window=4))
    assert outs[0].token_ids == ref.generate(prompts[0], 50)


def _burst(qwen3_path, borrow: bool, n: int = 8, max_tokens: int = 40):
    """n requests at once into a pool of 4 reserved slots (budget 2 x 8 tokens, 12 pages); per request,
    the step of its first token, whether it ever ran on a smaller budget, how often it was preempted, and
    its output."""
    llm = LLM(qwen3_path, block_size=8, budget_blocks=2, compression=dict(query_window=4), num_blocks=12,
              max_num_batched_tokens=128, borrow_reserved_pages=borrow)
    prompts = [[(i * 5 + j) % 250 + 3 for j in range(5 + i % 3)] for i in range(n)]
    first, shrunk, steps, preempted = {}, set(), [0], {}

    def watch(eng):
        steps[0] += 1
        for s in eng.scheduler.waiting:
            preempted[s.request_id] = s.num_preemptions
        for s in eng.scheduler.running:
            if s.num_output_tokens and s.request_id not in first:
                first[s.request_id] = steps[0]
            if s.budget_blocks != 2:
                shrunk.add(s.request_id)

    outs = run_checked(llm, prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), watch)
    return (llm, prompts, outs, [first[o.request_id] for o in outs], [o.request_id in shrunk for o in outs],
            [preempted.get(o.request_id, 0) for o in outs])


def test_borrowing_starts_every_request_at_once_and_loses_nothing(qwen3_path):
    """With borrowing, a burst twice the reserved slots all get a first token in the first steps, on pages the
    reserved requests are owed; those are taken back by preemption, and reserved requests are never
    preempted (the scheduler asserts it). Without it, half wait for a reservation. Every request that kept
    its budget equals the dense reference, recomputed ones included (recompute is exact)."""
    ref = DenseCompressedReference(qwen3_path, 8, 2, CompressionConfig(query_window=4))
    llm, prompts, outs, first, shrunk, _ = _burst(qwen3_path, borrow=True)
    stats = llm.stats()
    assert max(first) <= 3, first
    assert stats["preemptions"] > 0  # the borrowed pages were taken back
    assert all(len(o.token_ids) == 40 for o in outs)
    assert stats["free_pages"] == 12 and stats["running"] == stats["waiting"] == 0
    for p, o, small in zip(prompts, outs, shrunk):
        if not small:
            assert o.token_ids == ref.generate(p, 40)
    assert not all(shrunk)

    _, _, outs_off, first_off, _, preempted_off = _burst(qwen3_path, borrow=False)
    assert max(first_off) > 2 * max(first), (first, first_off)
    assert all(len(o.token_ids) == 40 for o in outs_off) and not any(preempted_off)


def test_borrowing_preempted_requests_wait_for_a_reservation(qwen3_path):
    """A request preempted off borrowed pages is readmitted only with a reservation (it would otherwise be
    admitted and preempted again and again): no request is preempted more than once."""
    llm, _, outs, _, _, preempted = _burst(qwen3_path, borrow=True, n=10, max_tokens=60)
    assert llm.stats()["preemptions"] == sum(preempted) > 0
    assert max(preempted) == 1, preempted
    assert all(len(o.token_ids) == 60 for o in outs)


def test_pressure_compresses_early_instead_of_preempting(qwen3_path):
    """Opportunistic requests that run out of pages mid-decode compress at what they hold."""
    llm = LLM(qwen3_path, block_size=8, budget_blocks=4, compression=dict(query_window=4), num_blocks=9,
              max_num_batched_tokens=64)
    prompts = [[(i * 5 + j) % 250 + 3 for j in range(7)] for i in range(3)]
    outs = run_checked(llm, prompts, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    stats = llm.stats()
    assert stats["early_compressions"] > 0
    assert all(len(o.token_ids) == 60 for o in outs)
    assert stats["free_pages"] == 9


REQ = st.tuples(st.integers(1, 40), st.integers(1, 60), st.sampled_from([None, 1, 2, 3]), st.integers(0, 2))


@settings(max_examples=int(os.environ.get("ZIPSERVE_HYPOTHESIS_EXAMPLES", 60)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reqs=st.lists(REQ, min_size=1, max_size=10), num_blocks=st.integers(8, 30), chunk=st.integers(4, 40),
       abort_at=st.lists(st.integers(0, 60), max_size=3), prefix=st.booleans(), borrow=st.booleans(),
       recall=st.sampled_from([None, dict(pages=1, host_gib=1e-3), dict(pages=2, host_pages=2, host_gib=2e-5)]))
def test_random_workloads_keep_invariants(qwen3_path, reqs, num_blocks, chunk, abort_at, prefix, borrow, recall):
    """Random mixes of budgets, prompt lengths, shared prefixes, aborts and a tight pool, with and without
    recall (and with a recall pool that runs out): invariants hold after every step (pages, reservations,
    budget + 1 after prefill, recall pages held once by live requests), everything finishes, nothing leaks."""
    llm = LLM(qwen3_path, block_size=8, budget_blocks=2, compression=dict(query_window=4, recall=recall),
              num_blocks=num_blocks, max_num_batched_tokens=chunk, enable_prefix_cache=prefix, max_model_len=1024,
              borrow_reserved_pages=borrow)
    eng = llm.engine
    shared = [9, 8, 7, 6, 5, 4, 3, 2, 1, 9, 8, 7, 6, 5, 4, 3]
    for i, (plen, mt, budget, fam) in enumerate(reqs):
        prompt = (shared[: fam * 8] + [(i * 37 + j) % 250 + 3 for j in range(plen)])[: max(plen, 1)]
        prompt = prompt[: num_blocks * 8 - 1]
        eng.add_request(f"h{i}", prompt, SamplingParams(temperature=0, max_tokens=mt, ignore_eos=True, budget_blocks=budget))
    step = 0
    while eng.has_unfinished_requests():
        eng.step()
        if step in abort_at and eng.scheduler.running:
            eng.abort_request(eng.scheduler.running[step % len(eng.scheduler.running)].request_id)
        eng.check_invariants()
        step += 1
        assert step < 5000, "no progress"
    s = eng.stats()
    assert s["free_pages"] == s["total_pages"] and s["running"] == s["waiting"] == 0
    assert s.get("recall_host_pages_used", 0) == 0


@pytest.mark.parametrize("kw, err, msg", [
    (dict(budget_blocks=0), ValueError, "budget_blocks"),
    (dict(budget_blocks=2, compression=dict(query_window=32)), ValueError, "query_window"),
    (dict(budget_blocks=2, compression=dict(pooling_width=4)), ValueError, "pooling_width"),
    (dict(budget_blocks=2, compression=dict(score_decay=1.5)), ValueError, "score_decay"),
    (dict(budget_blocks=2, compression=dict(use_similarity=True)), ValueError, "unknown compression option.*use_similarity"),
    (dict(budget_blocks=2, compression=dict(num_sink_tokens=25, query_window=8)), ValueError, "num_sink_tokens"),
    (dict(budget_blocks=2, compression=dict(num_sink_tokens=2, recent_window=31)), ValueError, "must be <= the budget"),
    (dict(budget_blocks=2, compression=dict(recent_window=-1)), ValueError, "recent_window"),
    (dict(budget_blocks=2, compression=dict(recent_fraction=1.5)), ValueError, "recent_fraction"),
    (dict(budget_blocks=2, compression=dict(recent_fraction=-0.1)), ValueError, "recent_fraction"),
    (dict(budget_blocks=2, compression=dict(prompt_fraction=2)), ValueError, "prompt_fraction"),
    (dict(budget_blocks=2, compression=dict(prompt_fraction="all")), ValueError, "prompt_fraction"),
    (dict(budget_blocks=8, num_blocks=5), ValueError, "fewer than one request's budget"),
])
def test_bad_compression_config(qwen3_path, kw, err, msg):
    with pytest.raises(err, match=msg):
        LLM(qwen3_path, block_size=16, **kw)


def test_preempted_request_waits_for_its_reservation_and_finishes(qwen3_path):
    """A request whose budget + 1 is the whole pool borrows, is preempted when the reserved one needs its
    pages, and can reserve only once that one is gone: it waits, then finishes (no hang)."""
    llm = LLM(qwen3_path, block_size=8, budget_blocks=2, compression=dict(query_window=4), num_blocks=8,
              max_num_batched_tokens=64)
    prompts = [[5, 6, 7], [9 + i % 200 for i in range(48)]]
    params = [SamplingParams(temperature=0, max_tokens=60, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=100, ignore_eos=True, budget_blocks=7)]
    outs = run_checked(llm, prompts, params)
    assert [len(o.token_ids) for o in outs] == [60, 100]
    assert llm.stats()["preemptions"] >= 1 and llm.stats()["free_pages"] == 8


def test_full_kv_reports_only_free_pages_to_the_router(qwen3_path):
    """Without a budget nothing is reserved or borrowed: the router's free pages are the free pages."""
    eng = LLM(qwen3_path, block_size=8, num_blocks=16, max_num_batched_tokens=256).engine
    for i in range(3):
        eng.add_request(f"r{i}", [3 + i + j % 50 for j in range(40)], SamplingParams(max_tokens=30, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.routing_state(with_hashes=False)["free_pages"] == eng.block_manager.num_free_blocks < 16


def test_bad_per_request_budget(qwen3_path):
    with pytest.raises(ValueError, match="budget_blocks"):
        SamplingParams(budget_blocks=0)
    small = LLM(qwen3_path, block_size=8, budget_blocks=2, compression=dict(query_window=4), num_blocks=8)
    with pytest.raises(ValueError, match="budget_blocks must be <= 7"):
        small.generate([[1, 2, 3]], SamplingParams(budget_blocks=8), use_tqdm=False)
    llm = LLM(qwen3_path, block_size=16)
    with pytest.raises(ValueError, match="runs full KV"):
        llm.generate([[1, 2, 3]], SamplingParams(budget_blocks=2), use_tqdm=False)
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3), use_tqdm=False)[0].finish_reason == "length"
