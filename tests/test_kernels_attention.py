"""Triton attention-path kernels against their plain-torch references (the oracles).

CPU tests run the kernels under the Triton interpreter (conftest sets TRITON_INTERPRET=1) at small shapes
in fp32/fp16; `gpu` tests run bf16 at real shapes. Every run draws fresh inputs (the seed is in the failure
message), poisons outputs/scratch with NaN and fills every cache slot that holds no live token with NaN, so
a kernel that reads past kv_len, leaves a row unwritten or multiplies garbage by a zero probability fails.
"""

import inspect
import random

import pytest
import torch

import zipserve.kernels.paged_attention as pa
from zipserve.kernels.kv_store import store_kv_ref, store_kv_triton
from zipserve.kernels.window_store import store_q_window_ref, store_q_window_triton


def _seed() -> int:
    seed = random.randrange(1 << 30)
    torch.manual_seed(seed)
    return seed


def make_batch(q_lens, kv_lens, *, block_size, h_kv, group, head_dim, dtype, device="cpu", spare_pages=3):
    """A paged batch: each request's pages are a random subset of the pool, padded block-table entries hold
    random page ids, and every slot not holding a live token is NaN."""
    B = len(q_lens)
    n_pages = [-(-L // block_size) for L in kv_lens]
    num_blocks = sum(n_pages) + spare_pages
    perm = 1 + torch.randperm(num_blocks - 1)  # page 0 stays all-NaN: masked lanes of kernels read it
    block_tables = torch.randint(0, num_blocks, (B, max(n_pages) + 2), dtype=torch.int32)
    slots, start = [], 0
    for b, n in enumerate(n_pages):
        pages = perm[start : start + n]
        start += n
        block_tables[b, :n] = pages
        t = torch.arange(kv_lens[b])
        slots.append(pages[t // block_size] * block_size + t % block_size)
    slots = torch.cat(slots).to(device)
    caches = []
    for _ in range(2):
        c = torch.full((num_blocks, block_size, h_kv, head_dim), float("nan"), dtype=dtype, device=device)
        c.view(-1, h_kv, head_dim)[slots] = torch.randn(len(slots), h_kv, head_dim, device=device).to(dtype)
        caches.append(c)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    q = (2 * torch.randn(int(qsl[-1]), h_kv * group, head_dim, device=device)).to(dtype)
    return dict(q=q, k_cache=caches[0], v_cache=caches[1], block_tables=block_tables.to(device),
                query_start_loc=qsl.to(device), kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=device),
                scale=head_dim**-0.5)


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs and scratch come back NaN-filled instead of uninitialized."""
    monkeypatch.setattr(pa, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                 device=device))


def test_signatures_match_references():
    assert inspect.signature(pa.paged_attention_triton) == inspect.signature(pa.paged_attention_ref)
    assert inspect.signature(store_kv_triton) == inspect.signature(store_kv_ref)
    assert inspect.signature(store_q_window_triton) == inspect.signature(store_q_window_ref)


# ---------------------------------------------------------------------------------------------------------
# CPU (interpreter)
# ---------------------------------------------------------------------------------------------------------

SHAPES = [  # block_size, h_kv, group, head_dim
    (4, 2, 1, 16),
    (8, 1, 4, 32),
    (16, 2, 2, 16),
    (8, 2, 3, 24),  # group and head dim not powers of two (masked head-dim lanes)
]
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-4), torch.float16: dict(atol=3e-3, rtol=1e-2)}


def _scenario(kind, rng):
    """(q_lens, kv_lens) of a small batch; kv_lens include random non-multiples of block_size."""
    if kind == "decode":
        kv = [rng.randint(1, 90) for _ in range(5)]
        q = [1] * 5
        q[rng.randrange(5)] = 0  # a request with no new rows this step
        return q, kv
    chunks = [rng.randint(2, 21) for _ in range(3)]
    prefixes = [0, rng.randint(1, 40), rng.randint(1, 40)]  # full prefill, chunks after a cached prefix
    q = chunks + [1, 1, 0]
    kv = [c + p for c, p in zip(chunks, prefixes)] + [rng.randint(1, 70), rng.randint(1, 70), rng.randint(1, 30)]
    order = list(range(len(q)))
    rng.shuffle(order)
    return [q[i] for i in order], [kv[i] for i in order]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "bs{}-hkv{}-g{}-d{}".format(*s))
@pytest.mark.parametrize("kind, split, hints", [("decode", False, False), ("decode", True, True),
                                                ("mixed", True, False), ("mixed", False, True),
                                                ("decode", True, "graph")])
def test_paged_attention_cpu(poisoned, monkeypatch, kind, split, hints, shape, dtype):
    seed = _seed()
    rng = random.Random(seed)
    # split: small partitions so decode rows take the split-K + reduce path; else one partition each.
    monkeypatch.setattr(pa, "_MIN_PARTITION", 16 if split else 1 << 20)
    block_size, h_kv, group, head_dim = shape
    q_lens, kv_lens = _scenario(kind, rng)
    batch = make_batch(q_lens, kv_lens, block_size=block_size, h_kv=h_kv, group=group, head_dim=head_dim,
                       dtype=dtype)
    # Hints are upper bounds: loose ones must not change the result. "graph": the bound a CUDA graph uses
    # (max_model_len), far above every length, so each request sizes its partitions from its own length.
    kw = dict(max_query_len=max(q_lens) + 3, max_kv_len=max(kv_lens) + 37) if hints else {}
    if hints == "graph":
        kw["max_kv_len"] = 8 * max(kv_lens)
    out = pa.paged_attention_triton(**batch, **kw)
    ref = pa.paged_attention_ref(**batch)
    torch.testing.assert_close(out, ref, **TOL[dtype], msg=lambda m: f"seed={seed} q={q_lens} kv={kv_lens}\n{m}")


@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_paged_attention_gpu_tiles_cpu(poisoned, monkeypatch, kind, block_size):
    """The tiles a GPU runs (GPU_TILES: 128 keys a step, 128-row query tiles) under the interpreter: tiles
    that span several pages, or several tiles in one page, and contexts ending inside a tile."""
    seed = _seed()
    rng = random.Random(seed)
    # as many programs as a GPU wants: contexts over 256 keys split into partitions (split-K, then the reduce)
    monkeypatch.setattr(pa, "_config", lambda device: pa._Config(**pa.GPU_TILES, programs=512))
    q_lens, kv_lens = _scenario(kind, rng)
    kv_lens = [k + rng.randint(0, 700) for k in kv_lens]  # several 128-key tiles
    batch = make_batch(q_lens, kv_lens, block_size=block_size, h_kv=2, group=4, head_dim=32, dtype=torch.float16)
    for kw in ({}, dict(max_query_len=max(q_lens), max_kv_len=4096)):  # exact hints, and a CUDA graph's
        out = pa.paged_attention_triton(**batch, **kw)
        torch.testing.assert_close(out, pa.paged_attention_ref(**batch), **TOL[torch.float16],
                                   msg=lambda m: f"seed={seed} q={q_lens} kv={kv_lens}\n{m}")


def test_paged_attention_empty_batch(poisoned):
    batch = make_batch([0, 0], [3, 5], block_size=4, h_kv=1, group=2, head_dim=16, dtype=torch.float32)
    assert pa.paged_attention_triton(**batch).shape == (0, 2, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_store_kv_cpu(dtype):
    seed = _seed()
    num_blocks, block_size, h_kv, d, T = 6, 8, 2, 16, 20
    qkv = torch.randn(T, (4 + 2 * h_kv) * d)  # k, v are strided views into a fused projection, as in the layer
    k = qkv[:, 4 * d : (4 + h_kv) * d].view(T, h_kv, d)
    v = qkv[:, (4 + h_kv) * d :].view(T, h_kv, d)
    slots = torch.randperm(num_blocks * block_size)[:T]
    slots[torch.rand(T) < 0.3] = -1
    caches = [torch.full((num_blocks, block_size, h_kv, d), float("nan"), dtype=dtype) for _ in range(4)]
    store_kv_ref(k, v, caches[0], caches[1], slots)
    store_kv_triton(k, v, caches[2], caches[3], slots)
    for got, want in ((caches[2], caches[0]), (caches[3], caches[1])):
        torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True, msg=lambda m: f"seed={seed}\n{m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_store_q_window_cpu(dtype):
    seed = _seed()
    T, h_q, d, S, Q, M = 12, 6, 16, 4, 8, 9
    q = torch.randn(T, h_q, 2 * d)[..., :d]  # strided rows
    rows = torch.randperm(T)[:M]
    flat = torch.randperm(S * Q)[:M]  # distinct (slot, pos) targets
    slots, pos = flat // Q, flat % Q
    want = torch.full((S, Q, h_q, d), float("nan"), dtype=dtype)
    got = want.clone()
    store_q_window_ref(q, want, rows, slots, pos)
    store_q_window_triton(q, got, rows, slots, pos)
    torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True, msg=lambda m: f"seed={seed}\n{m}")


# ---------------------------------------------------------------------------------------------------------
# GPU (bf16, real shapes)
# ---------------------------------------------------------------------------------------------------------

GPU = dict(block_size=256, h_kv=8, head_dim=128, dtype=torch.bfloat16, device="cuda")


def _rel_err_vs_fp32_ref(batch, out):
    ref = pa.paged_attention_ref(**{k: v.float() if k in ("q", "k_cache", "v_cache") else v
                                    for k, v in batch.items()})
    assert not out.isnan().any()
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("group", [4, 8])
@pytest.mark.parametrize("batch_size", [1, 8, 64])
@pytest.mark.parametrize("hints", [True, False])
def test_paged_attention_decode_gpu(poisoned, batch_size, group, hints):
    seed = _seed()
    rng = random.Random(seed)
    kv_lens = [32768] + [rng.randint(1, 32768) for _ in range(batch_size - 1)]
    batch = make_batch([1] * batch_size, kv_lens, group=group, **GPU)
    kw = dict(max_query_len=1, max_kv_len=32768) if hints else {}
    err = _rel_err_vs_fp32_ref(batch, pa.paged_attention_triton(**batch, **kw))
    assert err < 1e-2, f"seed={seed} rel err {err}"


@pytest.mark.gpu
@pytest.mark.parametrize("group", [4, 8])
def test_paged_attention_mixed_gpu(poisoned, group):
    """Chunked prefill beside decode rows: a full prefill, chunks after long cached prefixes, tiny chunks,
    decode rows up to 32k and a request with no rows."""
    seed = _seed()
    rng = random.Random(seed)
    q_lens = [2048, 1000, 3, 300, 0] + [1] * 11
    kv_lens = [2048, 1000 + 14000, 3 + 500, 300 + rng.randint(1, 20000), rng.randint(1, 9000)]
    kv_lens += [rng.randint(1, 32768) for _ in range(11)]
    order = list(range(len(q_lens)))
    rng.shuffle(order)
    q_lens, kv_lens = [q_lens[i] for i in order], [kv_lens[i] for i in order]
    batch = make_batch(q_lens, kv_lens, group=group, **GPU)
    err = _rel_err_vs_fp32_ref(batch, pa.paged_attention_triton(**batch))
    assert err < 1e-2, f"seed={seed} rel err {err}"


@pytest.mark.gpu
def test_paged_attention_decode_cuda_graph_gpu():
    """With hints the decode path makes no host sync and its grid depends only on shapes, so a captured
    graph replays correctly after the batch's contents change in place."""
    _seed()
    B, max_kv = 16, 8192
    batch = make_batch([1] * B, [max_kv] * B, group=8, **GPU)
    kw = dict(max_query_len=1, max_kv_len=max_kv)
    pa.paged_attention_triton(**batch, **kw)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pa.paged_attention_triton(**batch, **kw)
    for _ in range(2):
        batch["kv_lens"].copy_(torch.randint(1, max_kv + 1, (B,), dtype=torch.int32))
        batch["q"].copy_(torch.randn_like(batch["q"]))
        graph.replay()
        assert _rel_err_vs_fp32_ref(batch, out) < 1e-2


@pytest.mark.gpu
def test_store_kernels_gpu():
    _seed()
    T, h_kv, h_q, d, num_blocks, bs = 4096, 8, 64, 128, 64, 256
    k, v = (torch.randn(T, h_kv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    slots = torch.randperm(num_blocks * bs, device="cuda")[:T]
    slots[::7] = -1
    caches = [torch.zeros(num_blocks, bs, h_kv, d, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    store_kv_ref(k, v, caches[0], caches[1], slots)
    store_kv_triton(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    q = torch.randn(T, h_q, d, device="cuda", dtype=torch.bfloat16)
    rows = torch.randperm(T, device="cuda")[:256]
    flat = torch.randperm(64 * 128, device="cuda")[:256]
    want = torch.zeros(64, 128, h_q, d, device="cuda", dtype=torch.bfloat16)
    got = want.clone()
    store_q_window_ref(q, want, rows, flat // 128, flat % 128)
    store_q_window_triton(q, got, rows, flat // 128, flat % 128)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, head_dim", [(torch.float32, 128), (torch.float32, 256), (torch.bfloat16, 256)])
def test_paged_attention_wide_rows_gpu(poisoned, dtype, head_dim):
    """fp32 and head dim 256 take smaller tiles so K/V stages fit in shared memory."""
    seed = _seed()
    q_lens, kv_lens = [300, 1, 1, 40], [300, 5000, 700, 1000]
    batch = make_batch(q_lens, kv_lens, block_size=16, h_kv=2, group=4, head_dim=head_dim, dtype=dtype,
                       device="cuda")
    err = _rel_err_vs_fp32_ref(batch, pa.paged_attention_triton(**batch))
    assert err < (1e-4 if dtype == torch.float32 else 1e-2), f"seed={seed} rel err {err}"
