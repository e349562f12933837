"""Compressions replayed from captured CUDA graphs equal the eager batched path bit for bit.

On CPU (no graphs): the split of a batch into captured sizes, and the replay path (index arrays copied into an
entry's buffer, then the entry's graph run) with stand-in graphs that run the same device function on that
buffer, against one eager batch. On CUDA (marked gpu): real graphs over random K/V, and a whole engine."""

from types import SimpleNamespace

import pytest
import torch

from tests.test_compression_batched import bits, synthetic
from zipserve.workers.compressor import Compressor, _Graph, _layout, graph_chunks
from zipserve.workers.config import CompressionConfig


def test_graph_chunks_greedy():
    assert graph_chunks(7, (1, 2, 4)) == [4, 2, 1]
    assert graph_chunks(8, (4, 1, 2)) == [4, 4]
    assert graph_chunks(3, (1, 2)) == [2, 1]
    assert graph_chunks(5, (2, 4)) == [4, 1]  # the 1 left runs eagerly
    assert graph_chunks(1, (2, 4)) == [1]
    assert graph_chunks(3, ()) == [3]


def plan(rid, slot, src, dest, n, keep, num_scored, first):
    seq = SimpleNamespace(request_id=rid, window_slot=slot, num_prompt_tokens=6)
    return SimpleNamespace(seq=seq, src_table=src, dest_table=dest, release=[], kv_len=n, keep=keep, num_fresh=0,
                           num_scored=num_scored, first=first)


def steady_plans(count: int, bs: int, budget: int, first_page: int = 0, slots: int = 6):
    """`count` later compressions of budget + 1 full pages into budget pages, each on its own pages (its
    destination: its own source pages in another order), window slots reused (they are only read)."""
    out = []
    for i in range(count):
        src = list(range(first_page + i * (budget + 1), first_page + (i + 1) * (budget + 1)))
        out.append(plan(f"r{i}", i % slots, src, src[::-1], (budget + 1) * bs, budget * bs, budget * bs, False))
    return out


class StandIn:
    """A captured graph's stand-in on CPU: replay runs the device function on the entry's buffer."""

    def __init__(self, comp: Compressor, b: int, key: tuple, template):
        flat, spans = _layout(comp._index_arrays([template] * b))
        self.flat = torch.zeros(len(flat), dtype=torch.long)
        self.views, self.key, self.comp = [self.flat[s] for s in spans], key, comp

    def replay(self):
        self.comp._compact_device(*self.views, *self.key)


def install_stand_ins(comp: Compressor, template, sizes=(1, 2, 4)):
    key = (template.kv_len, template.keep, template.num_scored, template.first,
           comp.cfg.for_compression(template.keep, template.seq.num_prompt_tokens))
    for b in sizes:
        g = StandIn(comp, b, key, template)
        comp.graphs[(b, *key)] = _Graph(g.flat, g)
    comp._graph_sizes = tuple(sizes)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_replayed_chunks_equal_one_batch(backend):
    """Seven plans of the captured key go as chunks of 4, 2 and 1 through the replay path (each chunk's index
    arrays copied into its entry's buffer); an eighth of another key runs eagerly beside them. Caches equal
    those of one eager batch bit for bit; with kept indices logged, nothing replays."""
    bs, budget = 4, 2
    plans = steady_plans(7, bs, budget) + [plan("x", 5, [21, 22, 23], [22, 21, 23], 11, 8, 0, True)]
    want, got, logged = (synthetic(backend, NB=24, layer_group=2) for _ in range(3))
    for c in (got, logged):
        install_stand_ins(c, plans[0])
    logged.kept_log = []
    before = want.kv_cache.clone()
    for c in (want, got, logged):
        c.run(plans)
    assert want.graph_compressions == 0 and got.graph_compressions == 7 and logged.graph_compressions == 0
    assert got.stats()["graph_compressions"] == 7 and got.num_compressions == 8
    pages = [b for p in plans for b in p.dest_table[: p.keep // bs]]
    assert not torch.equal(bits(before[:, :, pages]), bits(want.kv_cache[:, :, pages]))  # compaction moved entries
    for c in (got, logged):
        assert torch.equal(bits(c.kv_cache), bits(want.kv_cache))
        assert torch.equal(bits(c.score_cache), bits(want.score_cache))


def test_capture_key_matches_the_block_managers_later_compression():
    """The captured keys are the ones a decoding request's first and later compressions make (the block manager sets
    num_scored to the keep of the compression before), and the steady-state plan the capture uses has it."""
    from zipserve.workers.block_manager import BlockManager

    bs, budget = 4, 2
    bm = BlockManager(32, bs, enable_prefix_cache=False)
    seq = SimpleNamespace(block_table=[], kv_len=0, num_scored=0, compressed=False, num_evicted=0,
                          num_compressions=0, num_computed_tokens=0)
    seq.block_table = [bm._pop_free() for _ in range(budget + 1)]
    plans = []
    for _ in range(2):
        seq.kv_len = (budget + 1) * bs
        plans.append(bm.plan_compaction(seq, budget))
        seq.compressed = True
    first, p = plans
    n, keep = (budget + 1) * bs, budget * bs
    comp = synthetic("torch")
    ref = comp._free_page_plan(budget, 0, 6, first=False)
    assert (p.kv_len, p.keep, p.num_scored, p.first) == (ref.kv_len, ref.keep, ref.num_scored, ref.first)
    assert (first.kv_len, first.keep, first.num_scored, first.first) == (n, keep, 0, True)  # its first, captured too


# ---- On CUDA: real graphs ------------------------------------------------------------------------------

SCORINGS = {"default": {}, "paper-set-continuous": dict(use_redundancy=True, use_pooling=True, continuous_pooling=True,
                                                        recent_fraction=0.0)}


def cuda_compressor(dtype, scoring, L=4, NB=40, bs=16, H=2, G=4, D=128, Q=16, slots=5):
    g = torch.Generator().manual_seed(3)
    kv = torch.randn(2, L, NB, bs, H, D, generator=g).to("cuda", dtype)
    qw = torch.randn(L, slots, Q, H * G, D, generator=g).to("cuda", dtype)
    sc = torch.rand(L, NB, bs, H, generator=g).cuda()
    cfg = CompressionConfig(query_window=Q, layer_group=3, **SCORINGS[scoring])
    return Compressor(cfg, kv, qw, sc, bs, D**-0.5, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scoring", list(SCORINGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("B", [1, 2, 3])
def test_gpu_graph_replays_equal_eager_batches(B, dtype, scoring):
    """Graphs of sizes 1 and 2 (B = 3 replays 2 + 1), captured after an eager warm-up: two calls (different
    pages and window slots, the second on a side stream as the runner's compression stream), each with a
    first compression of another key beside them (eager), leave the whole K/V pool and score cache
    bit-identical to an eager compressor's; every due plan of the captured key replayed."""
    bs, budget = 16, 3
    got = cuda_compressor(dtype, scoring)
    got.warm_up(budget, 4, 6)
    got.capture_graphs(budget, 4, sizes=(1, 2))
    assert sorted((b, key[3]) for b, *key in got.graphs) == [(1, False), (1, True), (2, False), (2, True)]  # later, first
    want = Compressor(got.cfg, got.kv_cache.clone(), got.q_window, got.score_cache.clone(), bs, got.scale,
                      backend="triton")  # the same caches as `got` after its capture wrote free pages
    start = got.kv_cache.clone()
    side = torch.cuda.Stream()
    for call, first_page in enumerate((budget + 1, 4 * (budget + 1))):
        plans = steady_plans(B, bs, budget, first_page=first_page, slots=4)
        for p in plans:
            p.seq.window_slot = (p.seq.window_slot + call) % 4
        other = first_page + B * (budget + 1)
        plans.append(plan("first", 3, list(range(other, other + budget + 1)), list(range(other, other + budget)),
                          (budget + 1) * bs - 5, budget * bs, 0, True))
        for c in (want, got):
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side if call else torch.cuda.current_stream()):
                c.run(plans)
            torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        assert got.graph_compressions == B * (call + 1) and want.graph_compressions == 0
        assert torch.equal(bits(got.kv_cache), bits(want.kv_cache)), f"call {call}: K/V differ"
        assert torch.equal(bits(got.score_cache), bits(want.score_cache)), f"call {call}: scores differ"
    pages = [b for p in plans[:B] for b in p.dest_table[:budget]]
    assert not torch.equal(bits(start[:, :, pages]), bits(got.kv_cache[:, :, pages]))  # the replays wrote


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_engine_with_compression_graphs_equals_without(model_factory, dtype):
    """The engine captures compression graphs at start and replays them for decoding requests' later
    compressions; the tokens equal those of the same engine with its graphs dropped (all eager)."""
    from zipserve.workers import LLM, SamplingParams

    path = model_factory("qwen3", layers=4, hidden=512, heads=8, kv_heads=2, head_dim=128, max_pos=4096)
    prompts = [[(i * 7 + j * 13) % 300 + 3 for j in range(n)] for i, n in enumerate([5, 40, 130, 9, 17, 77])]
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    common = dict(device="cuda", backend="triton", dtype=dtype, block_size=16, budget_blocks=4,
                  max_num_batched_tokens=128, compression=dict(query_window=16), kv_cache_memory_gb=2)
    outs, stats = {}, {}
    for graphs in (True, False):
        llm = LLM(path, **common)
        comp = llm.engine.runner.compressor
        assert sorted(b for b, *_ in comp.graphs) == [1, 1, 2, 2, 4, 4]  # a first and a later compression each
        if not graphs:
            comp.graphs.clear()
        outs[graphs] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        stats[graphs] = llm.stats()
        assert stats[graphs]["free_pages"] == stats[graphs]["total_pages"]
    assert stats[True]["graph_compressions"] > 0 and stats[False]["graph_compressions"] == 0
    assert stats[True]["compressions"] == stats[False]["compressions"] > stats[True]["graph_compressions"]
    assert outs[True] == outs[False]
