"""Batched compression (every plan of a step that the kernels treat alike, in one set of launches per layer
group) equals plan-by-plan compression bit for bit: kept indices, K/V pages and score-cache pages.

Each run() of an engine's compressor is shadowed by a plan-by-plan compressor on copies of the caches; both
must leave identical caches. The workloads make several requests due in one step: twins (same length, group
of two), lengths a page apart (due together, one a first compression: two groups in one call), long prompts
compressed at the end of their prefill (twins, and one of another length), and a request sharing cached
prefix pages. The dense-reference configurations of tests/test_compression.py; CPU kernels run in the
Triton interpreter (conftest sets TRITON_INTERPRET=1)."""

from types import SimpleNamespace

import pytest
import torch

from tests.engine_driver import run_checked
from tests.test_compression import CASES, MODELS, SCORING
from zipserve.kernels.compress import compact_batched_ref, compact_batched_triton, compact_ref
from zipserve.workers import LLM, SamplingParams
from zipserve.workers.compressor import Compressor, take
from zipserve.workers.layers.backend import get_kernel_set
from zipserve.workers.config import CompressionConfig

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def workload(bs: int, budget: int):
    """Prompts and arrival steps that put several requests due in the same steps (see the module doc)."""
    full = (budget + 1) * bs  # a cache this long is compressed
    long_a = [(7 * j) % 190 + 20 for j in range(full + 3)]
    prompts = [
        [5, 6, 7, 8, 9],
        [15, 16, 17, 18, 19],  # twin of the first
        [(3 * j) % 200 + 4 for j in range(5 + bs)],  # a page longer: due with the twins, one compression ahead
        [30, 31, 32],  # alone
        long_a,  # compressed at the end of its prefill ...
        [(11 * j) % 190 + 20 for j in range(full + 3)],  # ... with its twin
        [(13 * j) % 190 + 20 for j in range(full + 3 + bs // 2)],  # ... and beside one of another length
        long_a[: 2 * bs] + [201, 202, 203],  # shares long_a's first two pages (cached once it has run)
    ]
    return prompts, [0, 0, 0, 0, 0, 0, 0, 2]


class Shadowed:
    """Wraps a Compressor's run: the same plans, plan by plan, on copies of the caches, compared bitwise."""

    def __init__(self, comp: Compressor, backend: str):
        self.comp, self.backend, self.run = comp, backend, comp.run
        self.calls = []  # per run: the sizes of the batches it made
        comp.kept_log = []
        comp.run = self

    def __call__(self, plans):
        c = self.comp
        scores = None if c.score_cache is None else c.score_cache.clone()
        shadow = Compressor(c.cfg, c.kv_cache.clone(), c.q_window, scores, c.block_size, c.scale, backend=self.backend)
        shadow.batched, shadow.kept_log = False, []
        shadow.run(plans)
        sizes = []
        batch = c._compact_batch

        def record(group, cfg, logs):
            sizes.append(len(group))
            batch(group, cfg, logs)

        c._compact_batch, c.kept_log = record, []
        try:
            self.run(plans)
        finally:
            del c._compact_batch
        self.calls.append(sorted(sizes))
        assert len(c.kept_log) == len(shadow.kept_log) > 0
        for (rid, ns, l0, idx), (rid_s, ns_s, l0_s, idx_s) in zip(c.kept_log, shadow.kept_log):
            assert (rid, ns, l0) == (rid_s, ns_s, l0_s) and torch.equal(idx, idx_s)
        pages = torch.tensor(sorted({b for p in plans for b in p.dest_table[: p.keep // c.block_size]}),
                             device=c.kv_cache.device)
        assert torch.equal(bits(c.kv_cache[:, :, pages]), bits(shadow.kv_cache[:, :, pages])), "K/V pages differ"
        if c.score_cache is not None:
            assert torch.equal(bits(c.score_cache[:, pages]), bits(shadow.score_cache[:, pages])), "scores differ"
        if c.kv_cache.device.type == "cpu":  # the whole pool (on CUDA, other requests decode meanwhile)
            assert torch.equal(bits(c.kv_cache), bits(shadow.kv_cache))
            assert c.score_cache is None or torch.equal(bits(c.score_cache), bits(shadow.score_cache))


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bitwise view (NaN-safe; the pool's unused pages are uninitialised)."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def run_shadowed(path, comp_backend, block_size, budget, ccfg, **engine):
    """The engine's model runs on torch on the CPU (the interpreter would make the forward the test's cost);
    its compressor on `comp_backend`."""
    llm = LLM(path, block_size=block_size, budget_blocks=budget, compression=ccfg, num_blocks=96,
              max_num_batched_tokens=256, **engine)
    comp = llm.engine.runner.compressor
    comp.use_kernels(get_kernel_set(comp_backend))
    shadowed = Shadowed(comp, comp_backend)
    prompts, arrive = workload(block_size, budget)
    params = SamplingParams(temperature=0, max_tokens=(budget + 1) * block_size + 2, ignore_eos=True)
    run_checked(llm, prompts, params, arrive_at=arrive)
    stats = llm.stats()
    assert stats["prefix_cache_hits"] > 0 and stats["free_pages"] == stats["total_pages"]
    return shadowed.calls


def check_coverage(calls):
    """The workload exercised what it is for: a batch of several plans, and a call of several batches."""
    assert any(max(c) >= 2 for c in calls if c), calls
    assert any(len(c) >= 2 for c in calls), calls


# Every configuration on the torch backend (the batching logic); on Triton (interpreted on CPU, ~1 min each)
# the ones that take each scoring kernel's branches with stacked requests: lightning and all-pairs redundancy,
# pooling, global scores with sinks and a tail, and MHA. Each Triton kernel is also checked alone against its
# reference (tests/test_kernels_compress.py), and six configurations run compiled on CUDA in the gpu test below.
TRITON_CASES = [CASES[i] for i in (0, 4, 5, 6, 12)]
BACKEND_CASES = [("torch", c) for c in CASES] + [("triton", c) for c in TRITON_CASES]


@pytest.mark.parametrize("backend,case", BACKEND_CASES,
                         ids=[f"{b}-{m}-{s}-bs{bs}-B{k}-Q{q}" for b, (m, s, bs, k, q, _) in BACKEND_CASES])
def test_batched_equals_plan_by_plan(model_factory, backend, case):
    model, scoring, block_size, budget, window, chunk = case
    arch, kw = MODELS[model]
    ccfg = dict(SCORING[scoring], query_window=window)
    check_coverage(run_shadowed(model_factory(arch, **kw), backend, block_size, budget, ccfg, dtype="float32"))


@pytest.mark.gpu
@pytest.mark.parametrize("model,scoring,block_size,budget,window,chunk", CASES[:4] + CASES[-2:],
                         ids=[f"{m}-{s}-bs{b}-B{k}-Q{q}" for m, s, b, k, q, _ in CASES[:4] + CASES[-2:]])
def test_gpu_batched_equals_plan_by_plan_bf16(model_factory, model, scoring, block_size, budget, window, chunk):
    """Compiled kernels, bf16 caches: kept indices equal, compacted pages (and scores) bit-identical."""
    arch, kw = MODELS[model]
    ccfg = dict(SCORING[scoring], query_window=window)
    check_coverage(run_shadowed(model_factory(arch, **kw), "triton", block_size, budget, ccfg, dtype="bfloat16",
                                device="cuda", backend="triton", enforce_eager=True, max_num_seqs=16))


# ---- The pieces: batched compaction, and plans that depend on each other ---------------------------

COMPACT = [  # H, D (0: a score cache), bs, n, keep pages, per request (src pages, dest pages), dtype
    (2, 16, 4, 13, 2, [([3, 7, 1, 0], [7, 3]), ([9, 4, 8, 2], [2, 10]), ([5, 6, 11, 12], [12, 13])], torch.float32),
    (1, 0, 4, 16, 3, [([0, 1, 2, 3], [3, 2, 14]), ([0, 1, 5, 6], [6, 5, 15])], torch.float32),  # shared src 0, 1
    (2, 32, 8, 17, 2, [([2, 5, 1], [1, 2])], torch.float16),
]


@pytest.mark.parametrize("H,D,bs,n,kp,reqs,dtype", COMPACT)
def test_compact_batched_equals_compact_per_request(H, D, bs, n, kp, reqs, dtype):
    """One launch pair for every request equals compact_ref request by request (dest reusing own src
    pages in another order; two requests sharing source pages), the reference and Triton bitwise."""
    Lg, NB = 2, 16
    g = torch.Generator().manual_seed(n)
    shape = (Lg, NB, bs, H, D) if D else (Lg, NB, bs, H)
    pool = torch.randn(shape, generator=g).to(dtype).to(DEV)
    idx = torch.stack([torch.randperm(n, generator=g)[: kp * bs].sort().values for _ in range(len(reqs) * Lg * H)])
    idx = idx.view(len(reqs), Lg, H, kp * bs).to(DEV)
    src = torch.tensor([r[0] for r in reqs], device=DEV)
    dest = torch.tensor([r[1] for r in reqs], device=DEV)
    expect = pool.clone()
    for b in range(len(reqs)):  # sequentially: valid since no request writes a page another one reads
        compact_ref(expect, src[b], n, idx[b], dest[b])
    ref, out = pool.clone(), pool.clone()
    compact_batched_ref(ref, src, n, idx, dest)
    compact_batched_triton(out, src, n, idx, dest)
    assert torch.equal(bits(ref), bits(expect)) and torch.equal(bits(out), bits(expect))


def synthetic(backend, L=3, NB=24, bs=4, H=2, G=2, D=16, Q=3, layer_group=2, **ccfg):
    g = torch.Generator().manual_seed(7)
    kv = torch.randn(2, L, NB, bs, H, D, generator=g).to(DEV)
    qw = torch.randn(L, 6, Q, H * G, D, generator=g).to(DEV)
    sc = torch.rand(L, NB, bs, H, generator=g).to(DEV)
    cfg = CompressionConfig(query_window=Q, layer_group=layer_group, **ccfg)
    return Compressor(cfg, kv, qw, sc, bs, D**-0.5, backend=backend)


def plan(rid, slot, src, dest, n, keep, num_scored, first, prompt=6):
    seq = SimpleNamespace(request_id=rid, window_slot=slot, num_prompt_tokens=prompt)
    return SimpleNamespace(seq=seq, src_table=src, dest_table=dest, release=[], kv_len=n, keep=keep, num_fresh=0,
                           num_scored=num_scored, first=first)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compressor_batches_and_waves_equal_plan_by_plan(backend):
    """Direct plans: three alike (one batch, split in two by max_batch_tokens), one of another length, one
    with another prompt length where the prompt sets the sinks (its own batch), and a second plan of the
    first request reading the pages its first plan wrote (a second wave). Layer groups of 2 over 3 layers."""
    plans = [
        plan("a", 0, [0, 1, 2], [2, 0, 1], 11, 8, 8, False),
        plan("b", 1, [3, 4, 5], [5, 3, 6], 11, 8, 8, False),
        plan("c", 2, [7, 8, 9], [8, 7, 10], 11, 8, 8, False),
        plan("d", 3, [11, 12, 13, 14], [14, 11, 15], 15, 8, 8, False),
        plan("e", 4, [16, 17, 18], [17, 16, 19], 11, 8, 8, False, prompt=2),
        plan("a", 0, [2, 0, 1], [1, 2, 20], 10, 8, 8, False),  # reads what a's first plan wrote
    ]
    want, got = synthetic(backend, prompt_fraction=0.5), synthetic(backend, prompt_fraction=0.5)
    assert got._waves(plans) == [[0, 1, 2, 3, 4], [5]]
    got.max_batch_tokens = 24  # two plans of 3 pages of 4
    sizes = []
    batch = got._compact_batch
    got._compact_batch = lambda group, cfg, logs: (sizes.append(len(group)), batch(group, cfg, logs))
    want.batched, want.kept_log, got.kept_log = False, [], []
    want.run(plans)
    got.run(plans)
    assert sorted(sizes) == [1, 1, 1, 1, 2] and got.num_compressions == len(plans)
    assert [r[:3] for r in got.kept_log] == [r[:3] for r in want.kept_log]
    assert all(torch.equal(a[3], b[3]) for a, b in zip(got.kept_log, want.kept_log))
    assert torch.equal(bits(got.kv_cache), bits(want.kv_cache))
    assert torch.equal(bits(got.score_cache), bits(want.score_cache))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_long_compression_scores_fewer_layers_at_once(backend):
    """A compression longer than max_batch_tokens (a long prompt's) scores fewer layers per launch, so its
    scratch stays that of a full batch, and still equals plan by plan exactly."""
    plans = [plan("long", 0, [0, 1, 2, 3], [3, 0, 1], 15, 8, 8, False)]
    want, got = synthetic(backend, L=4, layer_group=4), synthetic(backend, L=4, layer_group=4)
    got.max_batch_tokens = 8  # two pages of 4: the 15 entries go two layers at a time
    assert got.layer_group_for(8) == 4 and got.layer_group_for(15) == 2 and got.layer_group_for(100) == 1
    want.batched, want.kept_log, got.kept_log = False, [], []
    want.run(plans)
    got.run(plans)
    assert [r[2] for r in got.kept_log] == [0, 2] and [r[2] for r in want.kept_log] == [0]
    assert torch.equal(torch.cat([r[3] for r in got.kept_log]), want.kept_log[0][3])
    assert torch.equal(bits(got.kv_cache), bits(want.kv_cache))
    assert torch.equal(bits(got.score_cache), bits(want.score_cache))


@pytest.mark.parametrize("dtype,last", [(torch.bfloat16, 128), (torch.bfloat16, 6), (torch.bfloat16, 3),
                                        (torch.float32, 8), (torch.float32, 1), (torch.int32, 2)])
def test_take_equals_indexing(dtype, last):
    """The widened copy returns exactly pool[index], for every width the last dim allows (and none)."""
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(3, 7, 4, 2, last, generator=g) * 100).to(dtype)
    rows, cols = torch.tensor([2, 0])[None, :, None], torch.tensor([[6, 1, 1], [0, 5, 3]])[:, None, :]
    for p, index in ((pool, (rows, cols)), (pool[1:], (slice(None), torch.tensor([4, 0, 2]))),
                     (pool[:, 2], (rows, cols[..., :2] % 4))):
        out = take(p, *index)
        assert out.dtype == p.dtype and torch.equal(out, p[index])
