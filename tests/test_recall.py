"""Recall of evicted KV in the engine (workers/host_store.py, Compressor._compact_recall) against the dense
reference's statement of the policy (tests/dense_reference.py), token for token, and the store's accounting:
pages back to the pool when requests end or are aborted, a full pool degrades to permanent eviction."""

import pytest
import torch

from tests.dense_reference import DenseCompressedReference
from tests.engine_driver import run_checked
from tests.test_compression import CASES as COMPRESSION_CASES
from tests.test_compression import MODELS, PROMPTS, SCORING
from zipserve.workers import LLM, SamplingParams
from zipserve.workers.config import CompressionConfig

CASES = [  # (model, scoring, block_size, budget, window, max_num_batched_tokens, recall pages, host_pages)
    *((*case, 1, None) for case in COMPRESSION_CASES),  # the engine's configuration matrix, one page recalled
    ("qwen3-gqa2", "attention-only", 4, 3, 2, 9, 2, None),
    ("qwen3-gqa2", "global-sinks-recent-fraction", 4, 3, 2, 9, 2, 3),  # the oldest closed pages dropped
]


@pytest.mark.parametrize("model,scoring,block_size,budget,window,chunk,pages,host_pages", CASES,
                         ids=[f"{m}-{s}-bs{b}-B{k}-Q{q}-r{r}-h{h}" for m, s, b, k, q, _, r, h in CASES])
def test_engine_with_recall_equals_dense_reference(model_factory, model, scoring, block_size, budget, window, chunk,
                                                   pages, host_pages):
    arch, kw = MODELS[model]
    path = model_factory(arch, **kw)
    ccfg = dict(SCORING[scoring], query_window=window)
    max_tokens = 32
    ref = DenseCompressedReference(path, block_size, budget, CompressionConfig(**ccfg), recall_pages=pages,
                                   host_pages=host_pages)
    expected = [ref.generate(p, max_tokens) for p in PROMPTS]
    assert sum(len(r) for comp in ref.recalled_log for layer in comp for r in layer) > 0  # entries came back
    if pages > 1:  # (and what the model says changed)
        plain = DenseCompressedReference(path, block_size, budget, CompressionConfig(**ccfg))
        assert [plain.generate(p, max_tokens) for p in PROMPTS] != expected
    recall = {"pages": pages, "host_pages": host_pages, "host_gib": 0.01}  # a small pool: invariants check it all
    llm = LLM(path, block_size=block_size, budget_blocks=budget, compression=dict(ccfg, recall=recall),
              max_num_batched_tokens=chunk, num_blocks=64)
    outs = run_checked(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                       arrive_at=[0, 0, 6, 1])
    assert [o.token_ids for o in outs] == expected
    stats = llm.stats()
    assert stats["compressions"] == len(ref.kept_log) > 0
    assert stats["recalled_pages"] > 0 and stats["recall_bytes_to_device"] > 0
    assert stats["recall_host_pages_used"] == 0  # every request ended: its pages are back
    assert stats["free_pages"] == stats["total_pages"]


def test_pool_that_holds_nothing_is_permanent_eviction(qwen3_path):
    """A recall pool too small for one page: every compression's evictions are dropped (and counted), and
    the engine says exactly what it says without recall; no request fails."""
    ccfg = dict(query_window=4, recent_fraction=0.25)
    plain = DenseCompressedReference(qwen3_path, 4, 2, CompressionConfig(**ccfg))
    expected = [plain.generate(p, 40) for p in PROMPTS]
    llm = LLM(qwen3_path, block_size=4, budget_blocks=2, num_blocks=64,
              compression=dict(ccfg, recall={"pages": 1, "host_gib": 1e-9}))
    outs = run_checked(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected
    s = llm.stats()
    assert s["recall_host_pages_total"] == 0 and s["recalled_pages"] == 0
    assert s["recall_pool_full"] == s["compressions"] > 0 and s["recall_dropped_entries"] > 0


def test_aborted_requests_give_their_recall_pages_back(qwen3_path):
    """Requests aborted while their stores hold pages (and one aborted mid-prefill): the pool is idle after."""
    llm = LLM(qwen3_path, block_size=4, budget_blocks=2, num_blocks=64,
              compression=dict(query_window=4, recall={"pages": 1, "host_gib": 0.01}))
    eng = llm.engine
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"a{i}", p, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    held = 0
    for step in range(400):
        eng.step()
        eng.check_invariants()
        held = max(held, eng.stats()["recall_host_pages_used"])
        if held and eng.stats()["recalled_pages"]:
            break
    assert held > 0 and eng.stats()["recalled_pages"] > 0
    for i in range(len(PROMPTS)):
        eng.abort_request(f"a{i}")
    while eng.has_unfinished_requests():
        eng.step()
        eng.check_invariants()
    s = eng.stats()
    assert s["recall_host_pages_used"] == 0 and s["free_pages"] == s["total_pages"]


def test_per_request_recall_pages_equal_the_dense_reference_at_that_setting(model_factory):
    """One batch, three requests: the engine's recall (2 pages), 1 page, and none (recall_pages 0: its
    evictions are not kept): each says what the dense reference says at its own setting."""
    arch, kw = MODELS["qwen3-gqa2"]
    path = model_factory(arch, **kw)
    ccfg = dict(SCORING["attention-only"], query_window=2)
    refs = {r: DenseCompressedReference(path, 4, 3, CompressionConfig(**ccfg), recall_pages=r) for r in (1, 2)}
    refs[0] = DenseCompressedReference(path, 4, 3, CompressionConfig(**ccfg))
    asked = [None, 1, 0, None]
    expected = [refs[2 if r is None else r].generate(p, 32) for p, r in zip(PROMPTS, asked)]
    for i in (1, 2):  # (each setting says something else: the engine cannot pass by ignoring it)
        assert expected[i] != refs[2].generate(PROMPTS[i], 32)
    llm = LLM(path, block_size=4, budget_blocks=3, compression=dict(ccfg, recall={"pages": 2, "host_gib": 0.01}),
              max_num_batched_tokens=9, num_blocks=64)
    params = [SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, recall_pages=r) for r in asked]
    outs = run_checked(llm, PROMPTS, params)
    assert [o.token_ids for o in outs] == expected
    s = llm.stats()
    assert s["recalled_pages"] > 0 and s["recall_host_pages_used"] == 0 and s["free_pages"] == s["total_pages"]


def test_per_request_recall_pages_is_checked_against_the_engine(qwen3_path):
    plain = LLM(qwen3_path, block_size=4, budget_blocks=2, num_blocks=64, compression=dict(query_window=4))
    with pytest.raises(ValueError, match="recall_pages needs an engine started with compression.recall"):
        plain.generate([PROMPTS[0]], SamplingParams(max_tokens=4, recall_pages=1), use_tqdm=False)
    llm = LLM(qwen3_path, block_size=4, budget_blocks=2, num_blocks=64,
              compression=dict(query_window=4, recall={"pages": 2, "host_gib": 0.01}))
    with pytest.raises(ValueError, match="recall_pages must be <= 2"):
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, recall_pages=3), use_tqdm=False)
    with pytest.raises(ValueError, match="recall_pages must be None or a non-negative integer"):
        SamplingParams(recall_pages=-1)
    assert llm.stats()["running"] == llm.stats()["waiting"] == 0  # nothing was queued


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_abort_storm_with_recall_leaks_nothing(qwen3_path, device):
    """Requests arriving over time, a third of them aborted at random points (queued, mid-prefill, while a
    compression is in flight, with pages in the host store): every step keeps the engine's invariants, and
    after the storm the host pool, the device pool and the compression queue are idle."""
    import random

    rng = random.Random(7)
    kw = dict(device="cuda", backend="triton") if device == "cuda" else {}
    llm = LLM(qwen3_path, block_size=4, budget_blocks=2, num_blocks=96, max_num_seqs=12, max_num_batched_tokens=24,
              compression=dict(query_window=4, recall={"pages": 1, "host_gib": 0.002}), **kw)
    eng = llm.engine
    live, aborted, held, step = [], 0, 0, 0
    for i in range(80):
        prompt = [rng.randrange(3, 250) for _ in range(rng.randint(3, 40))]
        eng.add_request(f"s{i}", prompt, SamplingParams(temperature=0, max_tokens=rng.randint(8, 120), ignore_eos=True))
        live.append(f"s{i}")
        for _ in range(rng.randint(0, 6)):
            eng.step()
            step += 1
            eng.check_invariants()
            held = max(held, eng.stats()["recall_host_pages_used"])
        if rng.random() < 0.4:
            aborted += eng.abort_request(live.pop(rng.randrange(len(live))))
    while eng.has_unfinished_requests():
        eng.step()
        eng.check_invariants()
        held = max(held, eng.stats()["recall_host_pages_used"])
    s = eng.stats()
    assert aborted >= 15 and held > 0 and s["recalled_pages"] > 0
    assert s["recall_host_pages_used"] == 0 and s["free_pages"] == s["total_pages"] and not eng.compactions.busy


def test_compression_warm_up_with_recall_leaves_everything_idle(qwen3_path):
    """The compressor's warm-up (run before the first request where the kernels compile, on a GPU) goes
    through the recalling path too, and leaves the host store and the device pool as it found them."""
    llm = LLM(qwen3_path, block_size=4, budget_blocks=2, num_blocks=16,
              compression=dict(query_window=4, recall={"pages": 1, "host_gib": 0.002}))
    eng = llm.engine
    comp = eng.runner.compressor
    comp.warm_up(2, comp.q_window.shape[1] - 1, 7)
    s = eng.stats()
    assert s["recall_host_pages_used"] == 0 and s["free_pages"] == s["total_pages"] and s["compressions"] == 0
    out = llm.generate([[5, 6, 7, 8, 9]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert len(out[0].token_ids) == 20 and eng.stats()["recalled_pages"] > 0


@pytest.mark.parametrize("recall, msg", [
    ({"pages": 0}, "pages"),
    ({"host_gib": 0}, "host_gib"),
    ({"host_pages": -1}, "host_pages"),
    ({"page": 1}, "unknown recall option"),
    ("yes", "recall"),
])
def test_bad_recall_options(qwen3_path, recall, msg):
    with pytest.raises(ValueError, match=msg):
        LLM(qwen3_path, block_size=4, budget_blocks=2, num_blocks=16, compression=dict(query_window=4, recall=recall))


def _store_round_trip(device: str, copy_runs, no_sync: bool):
    """Put 3.5 pages of evicted entries per (layer, head), take every closed page back: each recalled
    entry is the one put at its position (K, V, score), and after release every page is free again."""
    from zipserve.workers.host_store import HostKVStore

    L, H, D, bs, E = 3, 2, 8, 4, 14
    store = HostKVStore(L, H, D, bs, 64, torch.float32, torch.device(device), None, copy_runs)
    g = torch.Generator().manual_seed(7)
    k, v = torch.randn(L, E, H, D, generator=g), torch.randn(L, E, H, D, generator=g)
    pos = torch.arange(100, 100 + E)[None, :, None].expand(L, E, H).contiguous()
    sc = torch.rand(L, H, E, generator=g)
    q = torch.randn(L, 5, 2 * H, D, generator=g)
    dev = lambda t: t.to(device)  # noqa: E731
    args = [dev(t) for t in (k, v, pos, sc, q)]
    if no_sync:  # compile and warm the kernels first: only the store's own calls are checked
        _store_round_trip(device, copy_runs, False)
    if no_sync:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        assert store.admit("r", E)
        store.put("r", slice(0, L), *args[:4])
        taken = store.take("r", slice(0, L), args[4], 3)
    finally:
        if no_sync:
            torch.cuda.set_sync_debug_mode("default")
    got_pos = taken.pos.cpu()  # [L, 3 * bs, H]
    for l in range(L):
        for h in range(H):
            order = got_pos[l, :, h].argsort()
            p = got_pos[l, order, h] - 100
            assert p.tolist() == list(range(12))  # the three closed pages; the open one (2 entries) stays
            assert torch.equal(taken.k.cpu()[l, order, h], k[l, p, h])
            assert torch.equal(taken.v.cpu()[l, order, h], v[l, p, h])
            assert torch.equal(taken.g.cpu()[l, h, order], sc[l, h, p])
    store.release("r")
    store.check_invariants(set())
    assert store.stats()["recall_host_pages_used"] == 0


def test_store_round_trip_cpu():
    from zipserve.kernels.host_copy import copy_runs_ref, copy_runs_triton

    for fn in (copy_runs_ref, copy_runs_triton):
        _store_round_trip("cpu", fn, False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_store_moves_pages_without_host_syncs():
    """On CUDA the pool is pinned host memory the kernel reads and writes in place; put and take must not
    synchronise (sync debug mode raises on any synchronising call)."""
    from zipserve.kernels.host_copy import copy_runs_triton

    _store_round_trip("cuda", copy_runs_triton, True)
