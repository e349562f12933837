"""Causal attention of a batch of variable-length query chunks over their paged KV caches.

Each request b contributes q_len[b] new query rows (1 for decode, a chunk for prefill) whose K/V are
already stored; its cache holds kv_len[b] tokens in the pages block_tables[b]. Query row i of b sees
cache entries j <= kv_len[b] - q_len[b] + i (cache order, so this stays right after compression).
"""

import functools
import math
from dataclasses import dataclass
from types import MappingProxyType

import torch
import triton
import triton.language as tl


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, query_start_loc: torch.Tensor, kv_lens: torch.Tensor,
                        scale: float, *, max_query_len: int | None = None,
                        max_kv_len: int | None = None) -> torch.Tensor:
    """q: [T, H_q, D]; caches: [num_blocks, block_size, H_kv, D]; block_tables: [B, max_blocks] (int);
    query_start_loc: [B+1]; kv_lens: [B]. Returns [T, H_q, D] in q's dtype. Math in fp32.
    max_query_len / max_kv_len: optional upper bounds over the batch (used by the Triton version)."""
    T, h_q, d = q.shape
    bs, h_kv = k_cache.shape[1], k_cache.shape[2]
    group = h_q // h_kv
    out = torch.empty_like(q)
    starts, lens = query_start_loc.tolist(), kv_lens.tolist()
    q_lens = [starts[b + 1] - starts[b] for b in range(len(lens))]
    decode = [b for b in range(len(lens)) if q_lens[b] == 1]
    # Decode rows are batched (padded to the longest context); prefill chunks run one by one.
    if decode:
        idx = torch.tensor(decode, device=q.device)
        max_kv = max(lens[b] for b in decode)
        nblk = -(-max_kv // bs)
        pages = block_tables[idx, :nblk].long()
        k = k_cache[pages].reshape(len(decode), nblk * bs, h_kv, d).float()
        v = v_cache[pages].reshape(len(decode), nblk * bs, h_kv, d).float()
        rows = query_start_loc[idx].long()
        qd = q[rows].float().view(len(decode), h_kv, group, d)
        s = torch.einsum("bhgd,bkhd->bhgk", qd, k) * scale
        valid = torch.arange(nblk * bs, device=q.device)[None, :] < kv_lens[idx][:, None]
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
        v = v.masked_fill(~valid[:, :, None, None], 0.0)  # stale slots may hold anything, even NaN
        o = torch.einsum("bhgk,bkhd->bhgd", s.softmax(-1), v)
        out[rows] = o.reshape(len(decode), h_q, d).to(q.dtype)
    for b in range(len(lens)):
        if q_lens[b] == 1 or q_lens[b] == 0:
            continue
        n, kv = q_lens[b], lens[b]
        pages = block_tables[b, : -(-kv // bs)].long()
        k = k_cache[pages].reshape(-1, h_kv, d)[:kv].float()
        v = v_cache[pages].reshape(-1, h_kv, d)[:kv].float()
        qb = q[starts[b] : starts[b + 1]].float().view(n, h_kv, group, d)
        s = torch.einsum("qhgd,khd->hgqk", qb, k) * scale
        visible = torch.arange(kv, device=q.device)[None, :] <= (kv - n + torch.arange(n, device=q.device))[:, None]
        s = s.masked_fill(~visible, float("-inf"))
        o = torch.einsum("hgqk,khd->qhgd", s.softmax(-1), v)
        out[starts[b] : starts[b + 1]] = o.reshape(n, h_q, d).to(q.dtype)
    return out


# ----------------------------------------------------------------------------------------------------
# Triton
#
# One kernel body serves two launches. Query rows are flattened with their GQA group: tile row r is
# (token r // G, head r % G) of one KV head, so each K/V tile is loaded once for the whole group.
#   decode  grid (B, H_kv, P): one program per request's single row and KV partition of PART tokens
#           (split-K / flash-decoding); partial (max, sum, acc) go to scratch and _reduce_kernel merges
#           them. P depends only on host ints (B, max_kv_len), so the launch can be graph-captured.
#   prefill grid (T // TQ + B, H_kv): query tiles of TQ = BLOCK_M // G tokens. Request b owns virtual
#           tiles from qsl[b] // TQ + b on, which is increasing in b and leaves no overlap, so a program
#           finds its request by binary search over query_start_loc: no host-built index, no sync.
# Keys visible to every row of a tile are read without masks; only the last (causal/ragged) tiles mask.
# ----------------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634
_MIN_PARTITION = 256  # decode: fewest tokens per KV partition (enough work per program to amortize)
_MAX_PARTITIONS = 64  # decode: bounds the reduce kernel's [P, D] tile


@dataclass(frozen=True)
class _Config:
    prefill_m: int  # flattened (token, head) rows per query tile
    prefill_n: int  # keys per iteration
    prefill_warps: int
    decode_n: int
    decode_warps: int
    stages: int
    programs: int  # decode: aim for about this many programs


# Picked by sweeps on an H200 (bf16, D=128; benchmarks.attention_kernel, attention_kernel_h200.json): decode key
# tiles of 128 keep more K/V bytes in flight than 64 at the same warps and stages.
GPU_TILES = MappingProxyType(dict(prefill_m=128, prefill_n=128, prefill_warps=8, decode_n=128, decode_warps=4,
                                  stages=2))


@functools.lru_cache(maxsize=None)
def _config(device: torch.device) -> _Config:
    if device.type != "cuda":  # interpreter: small tiles exercise the tile boundaries
        return _Config(16, 16, 4, 16, 4, 1, 64)
    return _Config(**GPU_TILES, programs=4 * torch.cuda.get_device_properties(device).multi_processor_count)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every output/scratch allocation goes through here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _decode_partition(batch: int, h_kv: int, max_kv_len: int, block_size: int, block_n: int, programs: int):
    """Tokens per KV partition (a multiple of block_size and of the key tile) and partition count,
    chosen from host ints only: enough partitions to give the GPU about `programs` programs."""
    unit = math.lcm(block_size, block_n)
    want = max(1, min(_MAX_PARTITIONS, -(-programs // (batch * h_kv))))
    part = max(_MIN_PARTITION, -(-max_kv_len // want), -(-max_kv_len // _MAX_PARTITIONS))
    part = -(-part // unit) * unit
    return part, max(1, -(-max_kv_len // part))


@triton.jit
def _attend(acc, m_i, l_i, q, qk_scale, k_ptr, v_ptr, bt_row, j0, hi, last_key, k_head, v_head,
            s_kb, s_kt, s_vb, s_vt, offs_n, offs_d, d_ok,
            BS: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr):
    """One key tile j0 .. j0+BLOCK_N of online softmax. MASKED: keys >= hi and keys beyond a row's
    last_key are excluded (K/V loads masked, never multiplied in)."""
    j = j0 + offs_n
    j_ok = j < hi
    if MASKED:
        page = tl.load(bt_row + j // BS, mask=j_ok, other=0).to(tl.int64)
    else:
        page = tl.load(bt_row + j // BS).to(tl.int64)
    slot = j % BS
    k_ptrs = k_ptr + (page * s_kb + slot * s_kt + k_head)[:, None] + offs_d[None, :]
    v_ptrs = v_ptr + (page * s_vb + slot * s_vt + v_head)[:, None] + offs_d[None, :]
    if MASKED:
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # log2 units: scale * log2(e)
    if MASKED:
        s = tl.where(j_ok[None, :] & (j[None, :] <= last_key[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["num_reqs", "part", "n_parts", "unit", "s_bt"])  # batch-dependent ints: one compile
def _paged_attention_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, qsl_ptr, kvl_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
        qk_scale, num_reqs, part, n_parts, unit,
        s_qt, s_qh, s_ot, s_oh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt,
        G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BS: tl.constexpr, DECODE: tl.constexpr, SPLIT: tl.constexpr,
        PREC: tl.constexpr):
    h_kv = tl.program_id(1)
    if DECODE:  # one program per (request, KV head, partition); only requests with q_len 1
        TQ: tl.constexpr = 1
        b = tl.program_id(0)
        q0 = tl.load(qsl_ptr + b)
        n = tl.load(qsl_ptr + b + 1) - q0
        if n != 1:
            return
        t0 = 0
    else:  # one program per (query tile, KV head); requests with q_len 1 belong to the decode launch
        TQ: tl.constexpr = BLOCK_M // G
        v_tile = tl.num_programs(0) - 1 - tl.program_id(0)  # a request's last (longest) tiles first
        lo = 0
        hi = num_reqs - 1
        while lo < hi:  # last request whose first virtual tile qsl[b] // TQ + b is <= v_tile
            mid = (lo + hi + 1) // 2
            ok = tl.load(qsl_ptr + mid) // TQ + mid <= v_tile
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        b = lo
        q0 = tl.load(qsl_ptr + b)
        n = tl.load(qsl_ptr + b + 1) - q0
        t0 = (v_tile - q0 // TQ - b) * TQ
        if (n < 2) | (t0 >= n):
            return
    kv_len = tl.load(kvl_ptr + b)
    if DECODE:  # this request's partition: its own length over the n_parts programs (whole units)
        part_b = tl.maximum(part, tl.cdiv(tl.cdiv(kv_len, n_parts), unit) * unit)
        k_lo = tl.program_id(2) * part_b
        if k_lo >= kv_len:
            return
        k_hi = tl.minimum(k_lo + part_b, kv_len)
        k_full = k_hi
    else:
        k_lo = 0
        k_hi = kv_len - n + tl.minimum(t0 + TQ, n)  # one past the tile's last visible key
        k_full = kv_len - n + t0 + 1  # keys below this are visible to every row of the tile
    k_mid = k_lo + (k_full - k_lo) // BLOCK_N * BLOCK_N

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    tq = t0 + offs_m // G  # token of each row within the request
    head = h_kv * G + offs_m % G
    row_ok = (offs_m < TQ * G) & (tq < n)
    tok = (q0 + tq).to(tl.int64)
    q = tl.load(q_ptr + (tok * s_qt + head * s_qh)[:, None] + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)
    last_key = kv_len - n + tq  # causal: row sees cache entries <= last_key

    bt_row = bt_ptr + b * s_bt
    k_head = h_kv * s_kh
    v_head = h_kv * s_vh
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j0 in range(k_lo, k_mid, BLOCK_N):
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, qk_scale, k_ptr, v_ptr, bt_row, j0, k_hi, last_key, k_head, v_head,
                                s_kb, s_kt, s_vb, s_vt, offs_n, offs_d, d_ok, BS, False, EVEN_D, PREC)
    for j0 in range(k_mid, k_hi, BLOCK_N):
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, qk_scale, k_ptr, v_ptr, bt_row, j0, k_hi, last_key, k_head, v_head,
                                s_kb, s_kt, s_vb, s_vt, offs_n, offs_d, d_ok, BS, True, EVEN_D, PREC)

    if SPLIT:  # partial results of partition p for the reduce kernel
        idx = (b * (tl.num_programs(1) * G) + head) * n_parts + tl.program_id(2)
        tl.store(m_ptr + idx, m_i, mask=row_ok)
        tl.store(l_ptr + idx, l_i, mask=row_ok)
        tl.store(acc_ptr + idx.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=row_ok[:, None] & d_ok[None, :])
    else:
        o = acc / l_i[:, None]
        tl.store(out_ptr + (tok * s_ot + head * s_oh)[:, None] + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["part", "n_parts", "unit"])
def _reduce_kernel(out_ptr, m_ptr, l_ptr, acc_ptr, qsl_ptr, kvl_ptr, part, n_parts, unit, s_ot, s_oh,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    """Merge the partitions of one (decode request, query head): rescale each by exp2(m_p - max)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    q0 = tl.load(qsl_ptr + b)
    if tl.load(qsl_ptr + b + 1) - q0 != 1:
        return
    kv_len = tl.load(kvl_ptr + b)
    used = tl.cdiv(kv_len, tl.maximum(part, tl.cdiv(tl.cdiv(kv_len, n_parts), unit) * unit))
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    p_ok = offs_p < used
    idx = (b * tl.num_programs(1) + h) * n_parts + offs_p
    m = tl.load(m_ptr + idx, mask=p_ok, other=float("-inf"))
    w = tl.where(p_ok, tl.exp2(m - tl.max(m, 0)), 0.0)
    l = tl.sum(w * tl.load(l_ptr + idx, mask=p_ok, other=0.0), 0)
    acc = tl.load(acc_ptr + idx.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=p_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    o = tl.sum(w[:, None] * acc, 0) / l
    tl.store(out_ptr + q0.to(tl.int64) * s_ot + h * s_oh + offs_d, o.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, query_start_loc: torch.Tensor, kv_lens: torch.Tensor,
                           scale: float, *, max_query_len: int | None = None,
                           max_kv_len: int | None = None) -> torch.Tensor:
    """Same contract as paged_attention_ref. Rows of requests with q_len 1 take the split-K decode
    launch, longer ones the prefill launch. With both hints (upper bounds over the batch) there is no
    host sync and the grids depend only on shapes and hints (CUDA-graph friendly)."""
    T, h_q, d = q.shape
    B, bs, h_kv = kv_lens.shape[0], k_cache.shape[1], k_cache.shape[2]
    g = h_q // h_kv
    out = _empty((T, h_q, d), q.dtype, q.device)
    if T == 0 or B == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_kv_len is None:
        max_kv_len = int(kv_lens.max())
    q, k_cache, v_cache = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_cache, v_cache))
    cfg = _config(q.device)
    block_d = max(16, triton.next_power_of_2(d))
    row_bytes = k_cache.element_size() * block_d  # wide rows (fp32, D=256) get smaller tiles: shared memory
    prec = "ieee" if k_cache.dtype == torch.float32 else "tf32"
    common = dict(G=g, HEAD_DIM=d, BLOCK_D=block_d, BS=bs, PREC=prec, num_stages=cfg.stages)
    strides = (q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_cache.stride()[:3],
               *v_cache.stride()[:3], block_tables.stride(0))

    # Decode rows: split-K over KV partitions, then merge.
    decode_n = min(cfg.decode_n, max(16, 16384 // row_bytes))
    part, n_parts = _decode_partition(B, h_kv, max_kv_len, bs, decode_n, cfg.programs)
    unit = math.lcm(bs, decode_n)
    part = -(-_MIN_PARTITION // unit) * unit  # the kernels size each request's partitions from its own length
    split = n_parts > 1
    m = l = acc = out  # unused unless split
    if split:
        m = _empty((B, h_q, n_parts), torch.float32, q.device)
        l = _empty((B, h_q, n_parts), torch.float32, q.device)
        acc = _empty((B, h_q, n_parts, d), torch.float32, q.device)
    _paged_attention_kernel[(B, h_kv, n_parts)](
        q, k_cache, v_cache, block_tables, query_start_loc, kv_lens, out, m, l, acc,
        scale * _LOG2E, B, part, n_parts, unit, *strides, BLOCK_M=max(16, triton.next_power_of_2(g)),
        BLOCK_N=decode_n, DECODE=True, SPLIT=split, num_warps=cfg.decode_warps, **common)
    if split:
        _reduce_kernel[(B, h_q)](out, m, l, acc, query_start_loc, kv_lens, part, n_parts, unit, out.stride(0),
                                 out.stride(1), HEAD_DIM=d, BLOCK_D=block_d,
                                 BLOCK_P=_MAX_PARTITIONS, num_warps=4)  # one variant for every n_parts

    # Prefill / chunked-prefill rows: query tiles of TQ tokens x G heads.
    if max_query_len > 1:
        block_m = max(cfg.prefill_m if row_bytes <= 512 else min(cfg.prefill_m, 64), triton.next_power_of_2(g))
        block_n = min(cfg.prefill_n, max(16, 32768 // row_bytes))
        _paged_attention_kernel[(T // (block_m // g) + B, h_kv, 1)](
            q, k_cache, v_cache, block_tables, query_start_loc, kv_lens, out, out, out, out,
            scale * _LOG2E, B, 0, 1, 1, *strides, BLOCK_M=block_m, BLOCK_N=block_n, DECODE=False,
            SPLIT=False, num_warps=cfg.prefill_warps, **common)
    return out
