"""Compression kernels: the Triton versions against the plain-torch references (their oracle), and small
hand-computed cases of the reference policy itself.

On CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay
small; bf16 is tested on GPU only (the interpreter's bf16 arithmetic is wrong). To run the compiled
kernels on a GPU: TRITON_INTERPRET=0 pytest tests/test_kernels_compress.py (all tests then use CUDA)."""

import math
from types import SimpleNamespace

import pytest
import torch

import zipserve.kernels.compress as kc
from zipserve.kernels.compress import (compact_ref, compact_triton, compression_scores_ref, compression_scores_triton,
                              max_pool_ref, redundancy_ref, redundancy_triton, select_keep_ref, select_keep_triton,
                              window_attention_ref, window_attention_triton)
from zipserve.workers.compressor import Compressor
from zipserve.workers.config import CompressionConfig

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F32, F16 = torch.float32, torch.float16
SCORES = {"torch": compression_scores_ref, "triton": compression_scores_triton}
SELECT = {"torch": select_keep_ref, "triton": select_keep_triton}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every output and scratch buffer of the Triton wrappers starts as NaN (or a wild integer)."""
    def empty(shape, dtype, device):
        return torch.empty(shape, dtype=dtype, device=device).fill_(float("nan") if dtype.is_floating_point else -12345)
    monkeypatch.setattr(kc, "_empty", empty)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def keys(L, N, H, D, dtype, seed, dups=()):
    """Random keys; dups: (src, dst) pairs made near-duplicates (sim ~0.99, well above any threshold)."""
    g = gen(seed)
    k = torch.randn(L, N, H, D, generator=g)
    for src, dst in dups:
        k[:, dst] = k[:, src] * 1.5 + 0.05 * torch.randn(L, H, D, generator=g)
    return k.to(dtype).to(DEV)


def close(a, b, rtol=1e-5, atol=1e-6):
    assert a.shape == b.shape
    assert torch.equal(torch.isinf(a), torch.isinf(b)) and not a.isnan().any()
    fin = torch.isfinite(b)
    torch.testing.assert_close(a[fin], b[fin], rtol=rtol, atol=atol)


def same_selection(scores, idx_a, idx_b, tie=1e-5):
    """Kept sets must match, except between tokens whose reference scores are within `tie` of the cut."""
    assert idx_a.shape == idx_b.shape
    for row, (a, b) in enumerate(zip(idx_a.flatten(0, -2).tolist(), idx_b.flatten(0, -2).tolist())):
        diff = set(a) ^ set(b)
        if diff:
            s = scores.flatten(0, -2)[row]
            cut = s.sort(descending=True).values[len(a) - 1]
            assert all(abs(s[i] - cut) <= tie for i in diff), f"row {row}: {sorted(diff)} differ beyond near-ties"


# ---- Triton against the references (CPU: interpreter, small shapes) ---------------------------------

WINDOW = [  # L, Q, H_kv, GQA, D, N, dtype
    (1, 2, 1, 1, 16, 8, F32),
    (2, 4, 2, 2, 32, 70, F32),
    (1, 3, 2, 4, 16, 37, F16),
    (2, 4, 1, 4, 32, 65, F16),
    (1, 4, 2, 2, 16, 4, F32),  # the whole cache is the window
    (1, 20, 1, 2, 16, 45, F32),  # two query tiles
]


@pytest.mark.parametrize("L,Q,H,G,D,N,dtype", WINDOW)
def test_window_attention(L, Q, H, G, D, N, dtype):
    q = (torch.randn(L, Q, H * G, D, generator=gen(N)) * 2).to(dtype).to(DEV)
    k = keys(L, N, H, D, dtype, seed=N + 1)
    a = window_attention_triton(q, k, D**-0.5)
    close(a, window_attention_ref(q, k, D**-0.5))
    assert (a.sum(-1) >= 1 - 1e-5).all()  # a mean over queries of maxes of distributions


REDUNDANCY = [  # L, N, H, D, block_size (None = all pairs), dtype, threshold
    (1, 8, 1, 16, None, F32, 0.5),
    (2, 70, 2, 32, None, F32, 0.5),
    (1, 37, 2, 16, None, F16, 0.3),
    (1, 37, 2, 16, 8, F16, 0.5),
    (2, 70, 1, 16, 16, F32, 0.5),
    (1, 30, 2, 32, 4, F32, 0.3),
    (1, 29, 1, 16, 12, F32, 0.5),  # a page size that is no power of two: tiles span pages
    (1, 21, 2, 16, 8, F32, -0.2),  # negative threshold: padding and the diagonal must not count
    (1, 21, 1, 16, None, F32, -0.2),
]


@pytest.mark.parametrize("L,N,H,D,bs,dtype,thr", REDUNDANCY)
def test_redundancy(L, N, H, D, bs, dtype, thr):
    k = keys(L, N, H, D, dtype, seed=3 * N, dups=[(0, 2), (1, N - 1), (3, 5), (5, 6), (4, N // 2)])
    k[:, N // 3] = 0  # a zero key: normalised to zero (eps), similar to nothing
    r = redundancy_triton(k, thr, 0.4, bs)
    close(r, redundancy_ref(k, thr, 0.4, bs), rtol=1e-5, atol=1e-7)


CONFIGS = {
    "attention-only": dict(use_global_score=False, use_redundancy=False, use_pooling=False),
    "global": dict(use_redundancy=False, use_pooling=False),
    "paper-set": dict(use_redundancy=True, use_pooling=True),
    "all-pairs-sinks": dict(use_redundancy=True, use_pooling=True, lightning_redundancy=False, num_sink_tokens=2),
    "continuous-pooling-w3-decay0": dict(use_redundancy=True, use_pooling=True, pooling_width=3, continuous_pooling=True, score_decay=0.0),
    "pool-w7-lam0.5": dict(use_redundancy=True, use_pooling=True, pooling_width=7, redundancy_lambda=0.5, redundancy_threshold=0.2),
    "sinks-recent": dict(num_sink_tokens=11, recent_window=9, use_redundancy=False, use_pooling=True),
}
SCORE_CASES = [  # config, L, Q, H_kv, GQA, D, N, block_size, num_prev, first, dtype
    ("attention-only", 1, 2, 1, 2, 16, 13, 4, 0, True, F32),
    ("global", 2, 3, 2, 1, 16, 37, 8, 20, False, F32),
    ("paper-set", 2, 4, 2, 2, 32, 70, 16, 0, True, F32),
    ("paper-set", 1, 4, 1, 4, 16, 37, 8, 32, False, F16),
    ("all-pairs-sinks", 1, 3, 2, 2, 16, 45, 8, 16, True, F32),
    ("continuous-pooling-w3-decay0", 1, 2, 2, 2, 16, 30, 4, 12, False, F16),
    ("pool-w7-lam0.5", 2, 2, 1, 4, 32, 66, 16, 48, True, F32),
    ("sinks-recent", 1, 3, 2, 2, 16, 45, 8, 24, False, F32),
]


@pytest.mark.parametrize("name,L,Q,H,G,D,N,bs,num_prev,first,dtype", SCORE_CASES, ids=[c[0] for c in SCORE_CASES])
def test_compression_scores_and_selection(name, L, Q, H, G, D, N, bs, num_prev, first, dtype):
    cfg = CompressionConfig(query_window=Q, **CONFIGS[name])
    q = torch.randn(L, Q, H * G, D, generator=gen(N)).to(dtype).to(DEV)
    k = keys(L, N, H, D, dtype, seed=N + 7, dups=[(0, 1), (2, N - Q - 1), (5, 9)])
    # as the compressor passes it: a transposed view of the paged score cache
    g_prev = torch.rand(L, num_prev, H, generator=gen(N + 8)).to(DEV).transpose(1, 2) if num_prev else None
    s_ref, g_ref = compression_scores_ref(q, k, g_prev, num_prev, first, D**-0.5, cfg, bs)
    s, g = compression_scores_triton(q, k, g_prev, num_prev, first, D**-0.5, cfg, bs)
    close(s, s_ref)
    close(g, g_ref)
    keep = (N // 2 // bs) * bs or bs
    idx_ref = select_keep_ref(s_ref, keep)
    assert torch.equal(select_keep_triton(s_ref, keep), idx_ref)  # same scores: identical selection
    same_selection(s_ref, select_keep_triton(s, keep), idx_ref)  # the whole Triton path


@pytest.mark.parametrize("N,keep,kind", [(8, 3, "ties"), (37, 16, "ties"), (70, 33, "ties"), (70, 70, "randn"),
                                         (45, 1, "zeros"), (66, 40, "randn")])
def test_select_keep(N, keep, kind):
    g = gen(N * keep)
    if kind == "ties":  # many exact ties, infinities, and -0.0 beside +0.0
        s = torch.randint(-2, 3, (2, 3, N), generator=g).float()
        s[s == 2] = float("inf")
        s[..., ::5] = -0.0
    elif kind == "zeros":
        s = torch.zeros(1, 2, N)
        s[0, 1, ::2] = -0.0
    else:
        s = torch.randn(2, 2, N, generator=g) * 1e4
    s = s.to(DEV)
    assert torch.equal(select_keep_triton(s, keep), select_keep_ref(s, keep))


def _paged(Lg, NB, bs, H, D, dtype, seed):
    """A page pool full of NaN except random data in the pages a test uses."""
    shape = (Lg, NB, bs, H, D) if D else (Lg, NB, bs, H)
    return torch.full(shape, float("nan"), dtype=dtype), torch.randn(shape, generator=gen(seed)).to(dtype)


def _kept(Lg, H, n, keep, seed):
    g = gen(seed)
    return torch.stack([torch.randperm(n, generator=g)[:keep].sort().values for _ in range(Lg * H)]).view(Lg, H, keep)


COMPACT = [  # Lg, H, D (0: a score cache), bs, n, keep_pages, src pages, dest pages, dtype
    (2, 2, 16, 4, 37, 4, [3, 7, 1, 0, 9, 4, 8, 2, 6, 5], [6, 3, 0, 10], F32),  # dest reuse src pages, shuffled
    (1, 2, 32, 8, 24, 2, [2, 5, 1], [1, 2], F16),  # swap: page 1 <- from page 2's and page 1's entries
    (2, 1, 0, 4, 18, 3, [4, 0, 2, 3, 1], [2, 4, 5], F32),
    (1, 2, 16, 16, 70, 4, [0, 1, 2, 3, 4], [0, 1, 2, 3], F16),  # dest = src prefix: every write hits a read page
]


@pytest.mark.parametrize("Lg,H,D,bs,n,kp,src,dest,dtype", COMPACT)
def test_compact(Lg, H, D, bs, n, kp, src, dest, dtype):
    NB = 12
    pool, data = _paged(Lg, NB, bs, H, D, dtype, seed=n)
    for p in src + dest:
        pool[:, p] = data[:, p]
    pool, src_t, dest_t = pool.to(DEV), torch.tensor(src, device=DEV), torch.tensor(dest, device=DEV)
    idx = _kept(Lg, H, n, kp * bs, seed=n + 1).to(DEV)
    # the reference against its definition, entry by entry
    expect = pool.clone()
    for l in range(Lg):
        for h in range(H):
            for j, i in enumerate(idx[l, h].tolist()):
                expect[l, dest[j // bs], j % bs, h] = pool[l, src[i // bs], i % bs, h]
    ref = pool.clone()
    compact_ref(ref, src_t, n, idx, dest_t)
    out = pool.clone()
    compact_triton(out, src_t, n, idx, dest_t)
    as_bits = {F32: torch.int32, F16: torch.int16}[dtype]  # bitwise, NaN included
    assert torch.equal(ref.view(as_bits), expect.view(as_bits))
    assert torch.equal(out.view(as_bits), expect.view(as_bits))


def test_compressor_backends_agree():
    """One compaction through the Compressor: torch and triton backends, and the code it replaced."""
    L, NB, bs, H, G, D, Q, n, keep = 2, 12, 4, 2, 2, 16, 3, 18, 8
    cfg = CompressionConfig(query_window=Q, layer_group=1)
    kv = torch.randn(2, L, NB, bs, H, D, generator=gen(1)).to(DEV)
    qw = torch.randn(L, 2, Q, H * G, D, generator=gen(2)).to(DEV)
    sc = torch.rand(L, NB, bs, H, generator=gen(3)).to(DEV)
    plan = SimpleNamespace(seq=SimpleNamespace(window_slot=1, num_prompt_tokens=6), src_table=[5, 2, 9, 0, 7],
                           dest_table=[9, 5, 11], kv_len=n, keep=keep, num_scored=10, first=False)
    results = {}
    for backend in ("torch", "triton"):
        c = Compressor(cfg, kv.clone(), qw, sc.clone(), bs, D**-0.5, backend=backend)
        idx = c.kept_indices(plan, slice(0, L))
        c.run([plan])
        results[backend] = idx, c.kv_cache, c.score_cache
    # the inline compaction this refactor replaced
    kv_old, sc_old = kv.clone(), sc.clone()
    c = Compressor(cfg, kv_old, qw, sc_old, bs, D**-0.5)
    src, dest = torch.tensor(plan.src_table, device=DEV), torch.tensor(plan.dest_table[: keep // bs], device=DEV)
    for l in range(L):
        idx, g, _ = c._score_and_select(plan, slice(l, l + 1))
        for i in (0, 1):
            old = kv_old[i, l:l + 1, src].reshape(1, -1, H, D)[:, :n]
            kept = old.transpose(1, 2).gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, D)).transpose(1, 2)
            kv_old[i, l:l + 1, dest] = kept.reshape(1, keep // bs, bs, H, D)
        sc_old[l:l + 1, dest] = g.gather(2, idx).transpose(1, 2).reshape(1, keep // bs, bs, H)
    assert torch.equal(results["torch"][0], results["triton"][0])
    assert torch.equal(results["torch"][1], kv_old) and torch.equal(results["torch"][2], sc_old)
    assert torch.equal(results["triton"][1], kv_old)
    torch.testing.assert_close(results["triton"][2], sc_old, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="backend"):
        Compressor(cfg, kv, qw, sc, bs, 1.0, backend="cuda")


# ---- The reference policy by hand (and the Triton path on the same cases) ---------------------------

BOTH = pytest.mark.parametrize("backend", ["torch", "triton"])
WINDOW_FN = {"torch": window_attention_ref, "triton": window_attention_triton}
REDUNDANCY_FN = {"torch": redundancy_ref, "triton": redundancy_triton}
PLAIN = dict(use_global_score=False, use_redundancy=False, use_pooling=False)


def t(x):
    return torch.tensor(x, dtype=torch.float32, device=DEV)


@BOTH
def test_window_attention_by_hand(backend):
    # One query, a GQA group of two heads with opposite queries; logits (scale 1) are k * (+-1).
    k = t([0.0, math.log(2), math.log(4)]).view(1, 3, 1, 1)
    q = t([1.0, -1.0]).view(1, 1, 2, 1)
    # head 0: softmax(0, ln2, ln4) = (1, 2, 4)/7; head 1: (4, 2, 1)/7; max over the group
    close(WINDOW_FN[backend](q, k, 1.0), t([4 / 7, 2 / 7, 4 / 7]).view(1, 1, 3))
    # Two queries with zero logits: entry N-2 sees only entries 0..1 (causal), entry N-1 sees all three.
    close(WINDOW_FN[backend](torch.zeros(1, 2, 1, 1, device=DEV), k, 1.0),
          t([(1 / 2 + 1 / 3) / 2, (1 / 2 + 1 / 3) / 2, (0 + 1 / 3) / 2]).view(1, 1, 3))


@BOTH
def test_redundancy_by_hand(backend):
    # Tokens 0 and 2 identical; token 1 similar to both (cos 0.6 > 0.5). Each column excuses its latest
    # near-duplicate row: col 0 -> row 2, col 1 -> row 2, col 2 -> row 1. Row sums without the diagonal:
    # r0 = 0.6 + 1 (nothing excused: the earlier duplicate is penalised), r1 = 0.6 + 0.6 - 0.6,
    # r2 = 1 + 0.6 - 1 - 0.6 = 0 (the later duplicate is fully excused).
    page = [[1.0, 0.0], [0.6, 0.8], [2.0, 0.0]]
    r = REDUNDANCY_FN[backend](t(page).view(1, 3, 1, 2), 0.5, 0.4, None)
    close(r, torch.softmax(t([1.6, 0.6, 0.0]) / (0.4 * 3), 0).view(1, 1, 3))
    # Lightning, pages of 3: the same page, then a page of two copies of token 0 that excuse each other
    # (a lone pair is symmetric); duplicates across pages do not count.
    r = REDUNDANCY_FN[backend](t(page + [[1.0, 0.0], [3.0, 0.0]]).view(1, 5, 1, 2), 0.5, 0.4, 3)
    close(r, torch.softmax(t([1.6, 0.6, 0.0, 0.0, 0.0]) / (0.4 * 3), 0).view(1, 1, 5))
    # With a negative threshold every other key of the scope is a "duplicate", but never the key itself
    # nor padding: col 0 -> row 2, col 1 -> row 2, col 2 -> row 1 again, so r = (s01 + s02, 0, 0) =
    # (-1, 0, 0); in the second page (two copies, padded to 3) the copies excuse each other (the padded
    # slot, sim 0 > -2, would otherwise be the latest "duplicate" of both).
    signed = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]
    r = REDUNDANCY_FN[backend](t(signed).view(1, 3, 1, 2), -2.0, 1.0, None)
    close(r, torch.softmax(t([-1.0, 0.0, 0.0]) / 3, 0).view(1, 1, 3))
    r = REDUNDANCY_FN[backend](t(signed + [[1.0, 0.0], [2.0, 0.0]]).view(1, 5, 1, 2), -2.0, 1.0, 3)
    close(r, torch.softmax(t([-1.0, 0.0, 0.0, 0.0, 0.0]) / 3, 0).view(1, 1, 5))


def test_max_pool_by_hand():
    x = t([0, 0, 5, 0, 0, 0, 1])
    assert max_pool_ref(x, 3).tolist() == [0, 5, 5, 5, 0, 1, 1]
    assert max_pool_ref(x, 5).tolist() == [5, 5, 5, 5, 5, 1, 1]
    assert max_pool_ref(x, 1).tolist() == x.tolist()


def _peak(N, at, Q=1, strength=30.0):
    """Q queries that attend almost only to token `at`: every other key is zero (logit 0)."""
    k = torch.zeros(1, N, 1, 2, device=DEV)
    k[0, at, 0, 0] = 1.0
    q = torch.zeros(1, Q, 1, 2, device=DEV)
    q[..., 0] = strength
    return q, k


@BOTH
def test_pooling_spreads_peak_and_ties_go_later(backend):
    q, k = _peak(7, at=2)
    cfg = CompressionConfig(query_window=1, use_global_score=False, use_redundancy=False, use_pooling=True, pooling_width=3)
    s, g = SCORES[backend](q, k, None, 0, True, 1.0, cfg, 4)
    # G: the peak at 2, every other token the same tiny value; pooling copies the peak to 1 and 3
    assert s[0, 0, 1] == s[0, 0, 2] == s[0, 0, 3] == g[0, 0, 2] > 0.99 and s[0, 0, 6] == math.inf
    select = SELECT[backend]
    assert select(s, 4).tolist() == [[[1, 2, 3, 6]]]
    assert select(s, 3).tolist() == [[[2, 3, 6]]]  # three-way tie at the top: the later two
    assert select(s, 5).tolist() == [[[1, 2, 3, 5, 6]]]  # 0, 4, 5 tie (same tiny value): the latest
    s, _ = SCORES[backend](q, k, None, 0, False, 1.0, cfg, 4)  # no pooling after the first compression
    assert select(s, 2).tolist() == [[[2, 6]]]


@BOTH
def test_global_decay_by_hand(backend):
    q, k = torch.zeros(1, 1, 1, 2, device=DEV), torch.randn(1, 4, 1, 2, generator=gen(0)).to(DEV)  # A = 1/4 each
    cfg = CompressionConfig(query_window=1, use_redundancy=False, use_pooling=True, score_decay=0.8)
    g_prev = t([1.0, 0.1]).view(1, 1, 2)  # carried by the first two entries
    s, g = SCORES[backend](q, k, g_prev, 2, False, 1.0, cfg, 4)
    close(g, t([0.8, 0.25, 0.25, 0.25]).view(1, 1, 4))  # max(A, 0.8 * G_prev), A for the rest
    close(s, t([0.8, 0.25, 0.25, math.inf]).view(1, 1, 4))
    assert SELECT[backend](s, 2).tolist() == [[[0, 3]]]
    _, g = SCORES[backend](q, k, g_prev, 2, False, 1.0, CompressionConfig(query_window=1, **PLAIN), 4)
    close(g, t([0.25] * 4).view(1, 1, 4))  # global scores off: G = A


@BOTH
def test_sinks_and_window_forced_kept(backend):
    q, k = _peak(8, at=4, Q=2)
    cfg = CompressionConfig(query_window=2, num_sink_tokens=2, **PLAIN)
    s, _ = SCORES[backend](q, k, None, 0, True, 1.0, cfg, 4)
    assert s[0, 0, [0, 1, 6, 7]].isinf().all() and s[0, 0, 2:6].isfinite().all()
    assert SELECT[backend](s, 4).tolist() == [[[0, 1, 6, 7]]]  # the budget holds only sinks + window
    assert SELECT[backend](s, 5).tolist() == [[[0, 1, 4, 6, 7]]]  # then the attended token


@BOTH
def test_recent_window_forced_kept(backend):
    q, k = _peak(8, at=1, Q=2)
    cfg = CompressionConfig(query_window=2, recent_window=3, **PLAIN)
    s, _ = SCORES[backend](q, k, None, 0, True, 1.0, cfg, 4)
    assert s[0, 0, 5:].isinf().all() and s[0, 0, :5].isfinite().all()  # the tail is 3 entries, not the 2 queries
    assert SELECT[backend](s, 4).tolist() == [[[1, 5, 6, 7]]]  # then the attended token
    cfg = CompressionConfig(query_window=2, recent_window=20, **PLAIN)  # longer than the cache: all of it
    assert SCORES[backend](q, k, None, 0, True, 1.0, cfg, 4)[0].isinf().all()


@BOTH
def test_select_ties_by_hand(backend):
    select = SELECT[backend]
    assert select(t([[[1, 3, 3, 2, 3]]]), 2).tolist() == [[[2, 4]]]
    assert select(t([[[1, 3, 3, 2, 3]]]), 4).tolist() == [[[1, 2, 3, 4]]]
    assert select(t([[[0.0, -0.0, -1.0]]]), 1).tolist() == [[[1]]]  # -0.0 == 0.0: a tie, the later wins
    assert select(t([[[-math.inf, 5, -math.inf]]]), 2).tolist() == [[[1, 2]]]


# ---- GPU: bf16, real shapes ----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("name,N", [("paper-set", 2304), ("paper-set", 1000), ("all-pairs-sinks", 2304)])
def test_gpu_real_shapes(name, N):
    L, Q, H, G, D, bs = 4, 16, 8, 4, 128, 256
    cfg = CompressionConfig(query_window=Q, **CONFIGS[name])
    q = torch.randn(L, Q, H * G, D, generator=gen(N)).to(DEV, torch.bfloat16)
    k = keys(L, N, H, D, torch.bfloat16, seed=N + 1, dups=[(0, 1), (10, 300), (500, 900)])
    close(window_attention_triton(q, k, D**-0.5), window_attention_ref(q, k, D**-0.5), rtol=1e-4, atol=1e-7)
    bsz = bs if cfg.lightning_redundancy else None
    close(redundancy_triton(k, 0.5, 0.4, bsz), redundancy_ref(k, 0.5, 0.4, bsz), rtol=1e-4, atol=1e-9)
    num_prev = N // 2
    g_prev = torch.rand(L, num_prev, H, generator=gen(1)).to(DEV).transpose(1, 2)
    s_ref, g_ref = compression_scores_ref(q, k, g_prev, num_prev, False, D**-0.5, cfg, bs)
    s, g = compression_scores_triton(q, k, g_prev, num_prev, False, D**-0.5, cfg, bs)
    close(s, s_ref, rtol=1e-4, atol=1e-7)
    close(g, g_ref, rtol=1e-4, atol=1e-7)
    keep = (N // 2 // bs) * bs
    idx_ref = select_keep_ref(s_ref, keep)
    assert torch.equal(select_keep_triton(s_ref, keep), idx_ref)
    same_selection(s_ref, select_keep_triton(s, keep), idx_ref, tie=1e-6)
    # compaction of the bf16 pages, dest reusing src pages in another order
    NB = 2 * (-(-N // bs)) + 2
    pool = torch.randn(L, NB, bs, H, D, generator=gen(2)).to(DEV, torch.bfloat16)
    src = torch.randperm(NB, generator=gen(3))[: -(-N // bs)].to(DEV)
    dest = src[torch.randperm(len(src), generator=gen(4))][: keep // bs]
    ref, out = pool.clone(), pool.clone()
    compact_ref(ref, src, N, idx_ref, dest)
    compact_triton(out, src, N, idx_ref, dest)
    assert torch.equal(out, ref)


@pytest.mark.gpu
def test_gpu_all_pairs_32k_bounded_scratch():
    L, N, H, D = 1, 32768, 8, 128
    k = keys(L, N, H, D, torch.bfloat16, seed=5, dups=[(0, 1), (7, 30000), (20000, 32767)])
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    r = redundancy_triton(k, 0.5, 0.4, None)
    torch.cuda.synchronize()
    # scratch: latest int32 + row sums fp32 (+ the output): 12 bytes per (layer, head, token)
    assert torch.cuda.max_memory_allocated() - base <= 12 * L * H * N + (1 << 20)
    close(r, redundancy_ref(k, 0.5, 0.4, None), rtol=1e-4, atol=1e-10)


@pytest.mark.gpu
def test_gpu_compact_in_a_pool_past_2_pow_31_elements():
    """A serving pool (~100 GB for Qwen3-8B) puts layer offsets past 2**31 elements: the compaction kernels
    must address it in 64 bits (an int32 product crashed the first compression of a GPU server)."""
    Lg, bs, H, D = 3, 256, 8, 128
    pages = (2**31 // (bs * H * D)) // 2 + 8  # a layer of ~1.07e9 elements: layer 2 starts past 2**31
    pool = torch.zeros(Lg, pages, bs, H, D, dtype=torch.bfloat16, device="cuda")
    src, dest = [pages - 1, pages - 5, 3], [pages - 2, 3]
    g = torch.Generator(device="cuda").manual_seed(0)
    for p in src:
        pool[:, p].normal_(generator=g)
    n = 3 * bs - 17
    idx = torch.stack([torch.randperm(n, device="cuda", generator=g)[: 2 * bs].sort().values
                       for _ in range(Lg * H)]).view(Lg, H, 2 * bs)
    src_t, dest_t = torch.tensor(src, device="cuda"), torch.tensor(dest, device="cuda")
    want = {p: pool[:, p].clone() for p in src + dest}
    compact_ref_pages = {p: v.clone() for p, v in want.items()}
    small = torch.stack([compact_ref_pages[p] for p in sorted(set(src + dest))], 1)  # the same pages, renumbered
    renum = {p: i for i, p in enumerate(sorted(set(src + dest)))}
    compact_ref(small, torch.tensor([renum[p] for p in src], device="cuda"), n, idx,
                torch.tensor([renum[p] for p in dest], device="cuda"))
    compact_triton(pool, src_t, n, idx, dest_t)
    torch.cuda.synchronize()
    for p in dest:
        assert torch.equal(pool[:, p].view(torch.int16), small[:, renum[p]].view(torch.int16)), f"page {p}"
