"""Compression scoring and selection for Compressed PagedAttention (plain-torch references).

For one request and a group of layers, every cached token gets a score per (layer, KV head), and the
best `keep` are kept, in their original order. All math is fp32. Rows of the leading (layers) dimension
never mix, so B requests of one length are scored as one of B * Lg layers. The pieces (each switchable):

  A  window attention: the post-RoPE queries of the last Q cache entries attend (causally) over the
     whole cache; softmax over tokens, max over the GQA group, mean over the window.
  G  decayed global score: max(A, decay * G_prev) for tokens that carry a score from an earlier
     compression, A for the rest. G (not pooled) is what moves with the kept tokens.
  P  max-pooling of G along the tokens (odd width, stride 1, same padding), by default only at a
     request's first compression.
  R  key redundancy (R-KV style): cosine similarity between keys; each key excuses its latest
     near-duplicate (similarity > threshold); r_m sums row m; R = softmax(r / (T * N)) over tokens,
     N = tokens (all pairs) or block_size ("lightning": pairs within one page only).
  S  = lam * P - (1 - lam) * R (or P without redundancy); the first `num_sink_tokens` entries and the
     last max(Q, `recent_window`) (the window itself at least) get +inf, so they are always kept.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. macOS): the references still work
    triton = tl = None

# Request-dependent int arguments: lengths, and the strides of a tensor sized by them (the placeholder
# score tensor of a first compression has strides H * N, N; a batch's page tables and kept indices have
# rows of its page counts and keep).
_LENGTHS = ("N", "keep", "num_prev", "num_sink", "tail", "sg_l", "sg_h", "sg_n",
            "sp_b", "sd_b", "si_b", "si_l", "si_h")


def _jit(fn):
    """triton.jit, except that a request's lengths are not specialized on (Triton compiles a variant per
    value class: 1, multiples of 16, the rest): one compile serves every request, none while requests wait."""
    if triton is None:
        return fn
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[n for n in _LENGTHS if n in names])


_REDUNDANCY_ROW_TILE = 1024  # rows of the similarity matrix per tile (bounds scratch to tile x N)


def _per_layer(fn, *xs: torch.Tensor) -> torch.Tensor:
    """fn over the leading (layers) dimension, stacked. A matrix product's rounding may depend on how many
    rows share its launch; layer by layer, a request's scores do not depend on the batch it is scored in."""
    return torch.stack([fn(*(x[i] for x in xs)) for i in range(xs[0].shape[0])])


def window_attention_ref(q_win: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q_win: [L, Q, H_q, D] queries of cache entries N-Q .. N-1; k: [L, N, H_kv, D].
    Returns A: [L, H_kv, N] fp32 (each row a mean of probability distributions)."""
    L, Q, h_q, d = q_win.shape
    N, h_kv = k.shape[1], k.shape[2]
    g = h_q // h_kv
    logits = _per_layer(lambda q, k: torch.einsum("qhgd,nhd->hgqn", q, k),
                        q_win.float().view(L, Q, h_kv, g, d), k.float()) * scale
    q_idx = torch.arange(N - Q, N, device=k.device)
    causal = torch.arange(N, device=k.device)[None, :] <= q_idx[:, None]  # [Q, N]
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    return probs.amax(dim=2).mean(dim=2)


def redundancy_ref(k: torch.Tensor, threshold: float, temperature: float, block_size: int | None) -> torch.Tensor:
    """k: [L, N, H_kv, D]. Returns R: [L, H_kv, N] fp32. block_size=None: all pairs; else within pages."""
    kn = torch.nn.functional.normalize(k.float(), dim=-1, eps=1e-6).permute(0, 2, 1, 3)  # [L, H, N, D]
    L, H, N, _ = kn.shape
    if block_size is not None:
        nb = -(-N // block_size)
        pad = nb * block_size - N
        kp = torch.nn.functional.pad(kn, (0, 0, 0, pad)).view(L, H, nb, block_size, -1)
        sim = _per_layer(torch.matmul, kp, kp.transpose(-1, -2))  # [L, H, nb, bs, bs]; padding: zeros, sim 0
        real = (torch.arange(nb * block_size, device=k.device) < N).view(nb, block_size)
        r = _row_sums_excusing_latest(sim, threshold, real).reshape(L, H, nb * block_size)[..., :N]
        norm = block_size
    else:
        # Tile over rows m so scratch stays tile x N. Pass 1 finds, for every column n, the latest
        # m != n with sim > threshold; pass 2 sums rows and removes the excused entries.
        latest = torch.full((L, H, N), -1, dtype=torch.long, device=k.device)
        excused_val = torch.zeros(L, H, N, device=k.device)
        r = torch.empty(L, H, N, device=k.device)
        for m0 in range(0, N, _REDUNDANCY_ROW_TILE):
            rows = torch.arange(m0, min(N, m0 + _REDUNDANCY_ROW_TILE), device=k.device)
            sim = _per_layer(torch.matmul, kn[:, :, rows], kn.transpose(-1, -2))  # [L, H, tile, N]
            sim[:, :, torch.arange(len(rows)), rows] = 0.0
            r[:, :, rows] = sim.sum(-1)
            hit = sim > threshold
            hit[:, :, torch.arange(len(rows)), rows] = False  # a key is not its own duplicate
            cand = torch.where(hit, rows[None, None, :, None], torch.full_like(hit, -1, dtype=torch.long)).amax(2)
            val = torch.where(hit, sim, torch.zeros_like(sim))
            take = cand > latest  # later rows win
            latest = torch.where(take, cand, latest)
            best_val = val.gather(2, (cand - m0).clamp(min=0).unsqueeze(2)).squeeze(2)
            excused_val = torch.where(take, best_val, excused_val)
            del sim, hit, val
        has = latest >= 0
        r.scatter_add_(2, latest.clamp(min=0), torch.where(has, -excused_val, torch.zeros_like(excused_val)))
        norm = N
    return (r / (temperature * norm)).softmax(-1)


def _row_sums_excusing_latest(sim: torch.Tensor, threshold: float, real: torch.Tensor) -> torch.Tensor:
    """sim: [..., n, n] with rows m, columns n; real: [..., n] rows that are real keys (not padding).
    Zero the diagonal and, in each column, the entry of the latest real row m != n above threshold;
    return row sums [..., n]. (Padding and the diagonal have sim 0, which a negative threshold passes.)"""
    n = sim.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(eye, 0.0)
    rows = torch.arange(n, device=sim.device)[:, None].expand(n, n)
    hit = (sim > threshold) & ~eye & real.unsqueeze(-1)
    latest = torch.where(hit, rows, torch.full_like(rows, -1)).amax(-2)  # [..., n] per column
    excuse = (rows == latest.unsqueeze(-2)) & (latest.unsqueeze(-2) >= 0)
    return sim.masked_fill(excuse, 0.0).sum(-1)


def max_pool_ref(x: torch.Tensor, width: int) -> torch.Tensor:
    """Max-pool [..., N] along the last axis, odd width, stride 1, same padding."""
    shape = x.shape
    y = torch.nn.functional.max_pool1d(x.reshape(-1, 1, shape[-1]), width, stride=1, padding=width // 2)
    return y.reshape(shape)


def compression_scores_ref(q_win: torch.Tensor, k: torch.Tensor, g_prev: torch.Tensor | None, num_prev: int,
                           first: bool, scale: float, cfg, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores for one request over a layer group.

    q_win: [L, Q, H_q, D]; k: [L, N, H_kv, D]; g_prev: [L, H_kv, num_prev] global scores carried by
    the first num_prev entries (None when off or at the first compression); cfg: CompressionConfig.
    Returns (S [L, H_kv, N] selection scores, G [L, H_kv, N] global scores to carry)."""
    N = k.shape[1]
    a = window_attention_ref(q_win, k, scale)
    g = a
    if cfg.use_global_score and g_prev is not None and num_prev > 0:
        g = a.clone()
        g[..., :num_prev] = torch.maximum(a[..., :num_prev], cfg.score_decay * g_prev.float())
    s = max_pool_ref(g, cfg.pooling_width) if cfg.use_pooling and (first or cfg.continuous_pooling) else g
    if cfg.use_redundancy:
        r = redundancy_ref(k, cfg.redundancy_threshold, cfg.redundancy_temperature,
                           block_size if cfg.lightning_redundancy else None)
        s = cfg.redundancy_lambda * s - (1 - cfg.redundancy_lambda) * r
    s = s.clone()
    if cfg.num_sink_tokens:
        s[..., : cfg.num_sink_tokens] = float("inf")
    s[..., max(0, N - _tail(q_win, cfg)) :] = float("inf")
    return s, g


def _tail(q_win: torch.Tensor, cfg) -> int:
    """The recent entries always kept: the query window, or the configured recent window if longer."""
    return max(q_win.shape[1], cfg.recent_window)


def select_keep_ref(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` best tokens per (layer, head), in original order: [L, H_kv, keep].

    Ties (pooling makes them common) go to the later token, so selection is deterministic."""
    n = scores.shape[-1]
    order = scores.flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :keep]
    return (n - 1 - order).sort(dim=-1).values


def compact_ref(cache: torch.Tensor, src_pages: torch.Tensor, n: int, idx: torch.Tensor,
                dest_pages: torch.Tensor) -> None:
    """Pack one request's kept entries, per (layer, head), into its destination pages, in place.

    cache: [Lg, num_blocks, bs, H_kv, D] (K or V of a layer group) or [Lg, num_blocks, bs, H_kv] (scores);
    src_pages: [ceil(n / bs)] the request's source pages holding n entries; idx: [Lg, H_kv, keep] kept
    source indices; dest_pages: [keep // bs] (keep a multiple of bs). New entry j of (l, h) = old entry
    idx[l, h, j]. dest may reuse src pages in any order, so everything is read before anything is written."""
    c = cache if cache.dim() == 5 else cache.unsqueeze(-1)
    lg, _, bs, h, d = c.shape
    keep = idx.shape[-1]
    old = c[:, src_pages].reshape(lg, -1, h, d)[:, :n]  # a copy: safe in place
    kept = old.transpose(1, 2).gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, d)).transpose(1, 2)
    c[:, dest_pages] = kept.reshape(lg, keep // bs, bs, h, d)


def compact_batched_ref(cache: torch.Tensor, src_pages: torch.Tensor, n: int, idx: torch.Tensor,
                        dest_pages: torch.Tensor) -> None:
    """compact_ref for B requests of one length and one keep at once (one gather, one write, not B of each).

    src_pages: [B, ceil(n / bs)] each request's source pages; idx: [B, Lg, H_kv, keep]; dest_pages:
    [B, keep // bs]. Every read comes before any write, so a request's dest may reuse its own src pages;
    two requests may share source pages (a cached prefix) but never write a page another one reads."""
    c = cache if cache.dim() == 5 else cache.unsqueeze(-1)
    lg, _, bs, h, d = c.shape
    B, keep = idx.shape[0], idx.shape[-1]
    old = c[:, src_pages].reshape(lg, B, -1, h, d)[:, :, :n]  # a copy: safe in place
    kept = old.permute(1, 0, 3, 2, 4).gather(3, idx.unsqueeze(-1).expand(-1, -1, -1, -1, d))  # [B, lg, h, keep, d]
    c[:, dest_pages] = kept.permute(1, 0, 3, 2, 4).reshape(lg, B, keep // bs, bs, h, d)


# ----------------------------------------------------------------------------------------------------
# Triton versions: same signatures and results as the references above (which are their test oracle).
#
# Dot products run on the inputs' own dtype with fp32 accumulation: bf16/fp16 products are exact in
# fp32, so this equals the references' upcast-then-fp32 math up to summation order; fp32 inputs use
# input_precision="ieee" (no TF32). Scratch is O(L * H * N) (never N x N); see each wrapper.
# ----------------------------------------------------------------------------------------------------


def _block(n: int, lo: int = 16, hi: int = 64) -> int:
    """Tile length: a power of two in [lo, hi] (tl.dot needs >= 16), no larger than needed for n."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every output and scratch allocation of the Triton wrappers goes through here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _dot_operands(a: torch.Tensor, b: torch.Tensor):
    """Make both operands one dtype with unit last stride; say which dot precision keeps fp32 exact."""
    if a.dtype != b.dtype or a.dtype not in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    return a, b, "ieee" if a.dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs


@_jit
def _win_stats_kernel(q_ptr, k_ptr, m_ptr, s_ptr, N, Q, G, scale, sq_l, sq_q, sq_h, sk_l, sk_n, sk_h,
                      D: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                      PREC: tl.constexpr):
    """Pass 1, grid (L, H_q, Q tiles): row max and row sum of exp over the causal keys, online."""
    l, hq, qb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    qi = qb * BQ + tl.arange(0, BQ)
    d = tl.arange(0, BD)
    q = tl.load(q_ptr + l * sq_l + qi[:, None] * sq_q + hq * sq_h + d[None, :],
                mask=(qi[:, None] < Q) & (d[None, :] < D), other=0.0)
    last = N - Q + qi  # the last key query row qi sees
    k_base = k_ptr + l * sk_l + (hq // G) * sk_h
    m = tl.full([BQ], float("-inf"), tl.float32)
    s = tl.zeros([BQ], tl.float32)
    for n0 in range(0, N, BN):
        n = n0 + tl.arange(0, BN)
        k = tl.load(k_base + n[:, None] * sk_n + d[None, :], mask=(n[:, None] < N) & (d[None, :] < D), other=0.0)
        x = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        x = tl.where(n[None, :] <= last[:, None], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
        m = m_new
    row = (l * tl.num_programs(1) + hq) * Q + qi
    tl.store(m_ptr + row, m, mask=qi < Q)
    tl.store(s_ptr + row, s, mask=qi < Q)


@_jit
def _win_probs_kernel(q_ptr, k_ptr, m_ptr, s_ptr, a_ptr, N, Q, G, scale, sq_l, sq_q, sq_h, sk_l, sk_n, sk_h,
                      D: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                      PREC: tl.constexpr):
    """Pass 2, grid (L, H_kv, N tiles): normalised probabilities, max over the GQA group, mean over Q.
    The K tile is loaded once and serves every query of the group."""
    l, hk, nb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    h_kv = tl.num_programs(1)
    n = nb * BN + tl.arange(0, BN)
    d = tl.arange(0, BD)
    k = tl.load(k_ptr + l * sk_l + hk * sk_h + n[:, None] * sk_n + d[None, :],
                mask=(n[:, None] < N) & (d[None, :] < D), other=0.0)
    acc = tl.zeros([BN], tl.float32)
    for q0 in range(0, Q, BQ):
        qi = q0 + tl.arange(0, BQ)
        seen = (qi[:, None] < Q) & (n[None, :] <= (N - Q + qi)[:, None])
        best = tl.zeros([BQ, BN], tl.float32)  # probabilities are >= 0
        for g in range(G):
            hq = hk * G + g
            q = tl.load(q_ptr + l * sq_l + qi[:, None] * sq_q + hq * sq_h + d[None, :],
                        mask=(qi[:, None] < Q) & (d[None, :] < D), other=0.0)
            x = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            row = (l * h_kv * G + hq) * Q + qi
            m = tl.load(m_ptr + row, mask=qi < Q, other=0.0)
            s = tl.load(s_ptr + row, mask=qi < Q, other=1.0)
            p = tl.exp(x - m[:, None]) / s[:, None]
            best = tl.maximum(best, tl.where(seen, p, 0.0))
        acc += tl.sum(best, 0)
    tl.store(a_ptr + (l * h_kv + hk) * N + n, acc / Q, mask=n < N)


def window_attention_triton(q_win: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Same as window_attention_ref. Two passes over N (softmax needs each row's max and sum before any
    probability can be maxed over the group). Scratch: 2 * L * H_q * Q fp32."""
    L, Q, h_q, d = q_win.shape
    N, h_kv = k.shape[1], k.shape[2]
    assert h_q % h_kv == 0 and 0 < Q <= N
    q_win, k, prec = _dot_operands(q_win, k)
    m = _empty((L, h_q, Q), torch.float32, k.device)
    s = _empty((L, h_q, Q), torch.float32, k.device)
    a = _empty((L, h_kv, N), torch.float32, k.device)
    BQ, BN, BD = _block(Q), 64, _block(d, hi=1 << 20)
    args = (N, Q, h_q // h_kv, scale, *q_win.stride()[:3], *k.stride()[:3])
    _win_stats_kernel[(L, h_q, triton.cdiv(Q, BQ))](q_win, k, m, s, *args, D=d, BQ=BQ, BN=BN, BD=BD, PREC=prec)
    _win_probs_kernel[(L, h_kv, triton.cdiv(N, BN))](q_win, k, m, s, a, *args, D=d, BQ=BQ, BN=BN, BD=BD, PREC=prec)
    return a


@_jit
def _load_keys(base, t, end, sk_n, d, D: tl.constexpr):
    """Keys t (< end) of one (layer, head) and their inverse norms max(|k|, 1e-6)^-1 in fp32."""
    k = tl.load(base + t[:, None] * sk_n + d[None, :], mask=(t[:, None] < end) & (d[None, :] < D), other=0.0)
    kf = k.to(tl.float32)
    return k, 1.0 / tl.maximum(tl.sqrt(tl.sum(kf * kf, 1)), 1e-6)


@_jit
def _segment(t, B: tl.constexpr, N, SEG):
    """Indices t*B .. t*B+B-1 and the range [start, end) of the segments (pages, or all N) they touch."""
    idx = t * B + tl.arange(0, B)
    start = (t * B // SEG) * SEG
    end = tl.minimum(((tl.minimum(t * B + B, N) - 1) // SEG + 1) * SEG, N)
    return idx, start, end


@_jit
def _red_latest_kernel(k_ptr, latest_ptr, N, H, SEG, threshold, sk_l, sk_n, sk_h,
                       D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                       PREC: tl.constexpr):
    """Grid (L * H, column tiles). A segment is a page (lightning) or all N; pairs count only within
    one. Per column n: the latest row m != n of its segment with cosine sim > threshold (a max over
    rows). A tile may span several small pages (block-diagonal mask), so small pages cost few programs."""
    lh = tl.program_id(0)
    cols, start, end = _segment(tl.program_id(1), BN, N, SEG)
    base = k_ptr + (lh // H) * sk_l + (lh % H) * sk_h
    d = tl.arange(0, BD)
    kc, inv_c = _load_keys(base, cols, N, sk_n, d, D)
    latest = tl.full([BN], -1, tl.int32)
    for m0 in range(start, end, BM):
        rows = m0 + tl.arange(0, BM)
        kr, inv_r = _load_keys(base, rows, end, sk_n, d, D)
        sim = tl.dot(kr, tl.trans(kc), input_precision=PREC) * inv_r[:, None] * inv_c[None, :]
        pair = (rows[:, None] < end) & (rows[:, None] // SEG == cols[None, :] // SEG) & (rows[:, None] != cols[None, :])
        latest = tl.maximum(latest, tl.max(tl.where(pair & (sim > threshold), rows[:, None], -1), 0))
    tl.store(latest_ptr + lh * N + cols, latest, mask=cols < N)


@_jit
def _red_rows_kernel(k_ptr, latest_ptr, r_ptr, N, H, SEG, sk_l, sk_n, sk_h,
                     D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                     PREC: tl.constexpr):
    """Grid (L * H, row tiles): row sums of sim over the row's segment without the diagonal and without
    the entries each column excuses (its latest near-duplicate row). Sims are recomputed, not stored."""
    lh = tl.program_id(0)
    rows, start, end = _segment(tl.program_id(1), BM, N, SEG)
    base = k_ptr + (lh // H) * sk_l + (lh % H) * sk_h
    d = tl.arange(0, BD)
    kr, inv_r = _load_keys(base, rows, N, sk_n, d, D)
    r = tl.zeros([BM], tl.float32)
    for n0 in range(start, end, BN):
        cols = n0 + tl.arange(0, BN)
        kc, inv_c = _load_keys(base, cols, end, sk_n, d, D)
        lat = tl.load(latest_ptr + lh * N + cols, mask=cols < end, other=-1)
        sim = tl.dot(kr, tl.trans(kc), input_precision=PREC) * inv_r[:, None] * inv_c[None, :]
        pair = (cols[None, :] < end) & (rows[:, None] // SEG == cols[None, :] // SEG) & (rows[:, None] != cols[None, :])
        r += tl.sum(tl.where(pair & (lat[None, :] != rows[:, None]), sim, 0.0), 1)
    tl.store(r_ptr + lh * N + rows, r, mask=rows < N)


@_jit
def _softmax_rows_kernel(x_ptr, y_ptr, N, denom, BLOCK: tl.constexpr):
    """Grid (rows,): y = softmax(x / denom) over a row of N, two passes (online max/sum, then write)."""
    base = tl.program_id(0) * N
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    for n0 in range(0, N, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + base + n, mask=n < N, other=float("-inf")) / denom
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    for n0 in range(0, N, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + base + n, mask=n < N, other=0.0) / denom
        tl.store(y_ptr + base + n, tl.exp(x - m) / s, mask=n < N)


def redundancy_triton(k: torch.Tensor, threshold: float, temperature: float, block_size: int | None) -> torch.Tensor:
    """Same as redundancy_ref. Three launches: latest near-duplicate per column, row sums minus the
    excused entries, softmax. Similarities are recomputed in the second launch instead of stored.
    Scratch: L * H_kv * N int32 (latest) + L * H_kv * N fp32 (row sums)."""
    L, N, H, d = k.shape
    k, _, prec = _dot_operands(k, k)
    seg = N if block_size is None else block_size
    latest = _empty((L, H, N), torch.int32, k.device)
    r = _empty((L, H, N), torch.float32, k.device)
    out = _empty((L, H, N), torch.float32, k.device)
    BM = BN = _block(N)
    grid = (L * H, triton.cdiv(N, BN))
    common = dict(D=d, BM=BM, BN=BN, BD=_block(d, hi=1 << 20), PREC=prec)
    _red_latest_kernel[grid](k, latest, N, H, seg, threshold, *k.stride()[:3], **common)
    _red_rows_kernel[grid](k, latest, r, N, H, seg, *k.stride()[:3], **common)
    _softmax_rows_kernel[(L * H,)](r, out, N, temperature * seg, BLOCK=_block(N, hi=1024))
    return out


@_jit
def _scores_finish_kernel(a_ptr, gp_ptr, r_ptr, s_ptr, g_ptr, N, H, num_prev, num_sink, tail,
                          decay, lam, one_minus_lam, sg_l, sg_h, sg_n,
                          USE_G: tl.constexpr, W: tl.constexpr, USE_R: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (L * H, N tiles): G = max(A, decay * G_prev) (first num_prev entries), P = max-pool of G
    over [n - W, n + W] (G recomputed at the neighbours instead of a second launch), S = lam * P -
    (1 - lam) * R, sinks and the recent tail = +inf."""
    lh, t = tl.program_id(0), tl.program_id(1)
    n = t * BLOCK + tl.arange(0, BLOCK)
    pooled = tl.full([BLOCK], float("-inf"), tl.float32)
    for o in tl.static_range(2 * W + 1):
        j = n + (o - W)
        ok = (j >= 0) & (j < N)
        g = tl.load(a_ptr + lh * N + j, mask=ok, other=float("-inf"))
        if USE_G:
            gp = tl.load(gp_ptr + (lh // H) * sg_l + (lh % H) * sg_h + j * sg_n, mask=ok & (j < num_prev), other=0.0)
            g = tl.where(j < num_prev, tl.maximum(g, decay * gp.to(tl.float32)), g)
        if o == W:
            tl.store(g_ptr + lh * N + n, g, mask=n < N)
        pooled = tl.maximum(pooled, g)
    s = pooled
    if USE_R:
        r = tl.load(r_ptr + lh * N + n, mask=n < N, other=0.0)
        s = lam * s - one_minus_lam * r
    s = tl.where((n < num_sink) | (n >= N - tail), float("inf"), s)
    tl.store(s_ptr + lh * N + n, s, mask=n < N)


def compression_scores_triton(q_win: torch.Tensor, k: torch.Tensor, g_prev: torch.Tensor | None, num_prev: int,
                              first: bool, scale: float, cfg, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as compression_scores_ref: window attention, redundancy, then one fused elementwise kernel
    for decay, pooling (in Triton), the combination and the forced entries. Scratch: that of the
    parts plus A and R, 2 * L * H_kv * N fp32."""
    L, N, H = k.shape[:3]
    a = window_attention_triton(q_win, k, scale)
    use_g = bool(cfg.use_global_score and g_prev is not None and num_prev > 0)
    pool = cfg.use_pooling and (first or cfg.continuous_pooling)
    r = redundancy_triton(k, cfg.redundancy_threshold, cfg.redundancy_temperature,
                          block_size if cfg.lightning_redundancy else None) if cfg.use_redundancy else a
    gp = g_prev if use_g else a  # a: a placeholder pointer, never read
    s, g = _empty(a.shape, torch.float32, a.device), _empty(a.shape, torch.float32, a.device)
    lam = float(cfg.redundancy_lambda)
    BLOCK = _block(N, hi=1024)
    _scores_finish_kernel[(L * H, triton.cdiv(N, BLOCK))](
        a, gp, r, s, g, N, H, num_prev if use_g else 0, cfg.num_sink_tokens, _tail(q_win, cfg),
        float(cfg.score_decay), lam, 1 - lam, *gp.stride()[:3],
        USE_G=use_g, W=cfg.pooling_width // 2 if pool else 0, USE_R=bool(cfg.use_redundancy), BLOCK=BLOCK)
    return s, g


@_jit
def _orderable(x):
    """fp32 -> int64 key in [0, 2^32) with the same order (-0.0 made +0.0 so it ties with +0.0)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2147483648


@_jit
def _topk_kernel(s_ptr, out_ptr, N, keep, BLOCK: tl.constexpr):
    """Grid (L * H,): a radix select. Eight counting passes, 4 bits each, find the keep-th largest key T
    (each pass counts the keys >= 16 candidates at once); entries > T are kept, and of those == T the
    last (keep - #greater); a final pass writes the kept indices in order with a running prefix sum."""
    row = tl.program_id(0)
    base = s_ptr + row * N
    digit = tl.arange(0, 16).to(tl.int64)
    t = tl.zeros([], tl.int64)
    step = tl.full([], 1 << 28, tl.int64)
    for _ in range(8):  # invariant: at least keep keys are >= t
        cand = t + digit * step
        cnt = tl.zeros([16], tl.int32)
        for n0 in range(0, N, BLOCK):
            n = n0 + tl.arange(0, BLOCK)
            key = tl.where(n < N, _orderable(tl.load(base + n, mask=n < N, other=0.0)), -1)
            cnt += tl.sum((key[:, None] >= cand[None, :]).to(tl.int32), 0)
        t += (tl.sum((cnt >= keep).to(tl.int32), 0) - 1) * step  # counts fall with the digit
        step = step // 16
    gt = tl.zeros([], tl.int32)
    eq = tl.zeros([], tl.int32)
    for n0 in range(0, N, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        key = tl.where(n < N, _orderable(tl.load(base + n, mask=n < N, other=0.0)), -1)
        gt += tl.sum((key > t).to(tl.int32), 0)
        eq += tl.sum((key == t).to(tl.int32), 0)
    ties = keep - gt  # ties kept: the latest ones
    pos = tl.zeros([], tl.int32)
    eq_seen = tl.zeros([], tl.int32)
    for n0 in range(0, N, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        key = tl.where(n < N, _orderable(tl.load(base + n, mask=n < N, other=0.0)), -1)
        is_eq = (key == t).to(tl.int32)
        eq_incl = eq_seen + tl.cumsum(is_eq, 0)
        kept = (key > t) | ((is_eq == 1) & (eq - eq_incl < ties))
        at = pos + tl.cumsum(kept.to(tl.int32), 0) - 1
        tl.store(out_ptr + row * keep + at, n.to(tl.int64), mask=kept)
        pos += tl.sum(kept.to(tl.int32), 0)
        eq_seen += tl.sum(is_eq, 0)


def select_keep_triton(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Same as select_keep_ref (ties to the later index, result ascending), one program per (layer,
    head); fp32 scores without NaN. No scratch beyond the output."""
    L, H, N = scores.shape
    assert 0 <= keep <= N
    scores = scores.float().contiguous()
    out = _empty((L, H, keep), torch.int64, scores.device)
    if keep:
        _topk_kernel[(L * H,)](scores, out, N, keep, BLOCK=_block(N, hi=1024))
    return out


@_jit
def _compact_gather_kernel(cache_ptr, pages_ptr, idx_ptr, buf_ptr, keep, H, LG, BS, sc_l, sc_b, sc_s, sc_h,
                           sp_b, sp_p, si_b, si_l, si_h, si_j, D: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr):
    """Grid (B * Lg * H, keep tiles): buf[b, l, h, j] = entry idx[b, l, h, j] of request b's source pages."""
    blh, t = tl.program_id(0).to(tl.int64), tl.program_id(1)  # l * sc_l passes 2**31 elements in a ~100 GB pool
    b, l, h = blh // H // LG, blh // H % LG, blh % H
    j = t * BJ + tl.arange(0, BJ)
    d = tl.arange(0, BD)
    mask = (j[:, None] < keep) & (d[None, :] < D)
    i = tl.load(idx_ptr + b * si_b + l * si_l + h * si_h + j * si_j, mask=j < keep, other=0).to(tl.int64)
    page = tl.load(pages_ptr + b * sp_b + (i // BS) * sp_p, mask=j < keep, other=0).to(tl.int64)
    src = cache_ptr + l * sc_l + h * sc_h + (page * sc_b + (i % BS) * sc_s)[:, None] + d[None, :]
    tl.store(buf_ptr + (blh * keep + j[:, None]) * D + d[None, :], tl.load(src, mask=mask), mask=mask)


@_jit
def _compact_write_kernel(cache_ptr, pages_ptr, buf_ptr, keep, H, LG, BS, sc_l, sc_b, sc_s, sc_h, sd_b, sd_p,
                          D: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr):
    """Grid (B * Lg * H, keep tiles): entry j of request b's destination pages = buf[b, l, h, j]."""
    blh, t = tl.program_id(0).to(tl.int64), tl.program_id(1)
    b, l, h = blh // H // LG, blh // H % LG, blh % H
    j = t * BJ + tl.arange(0, BJ)
    d = tl.arange(0, BD)
    mask = (j[:, None] < keep) & (d[None, :] < D)
    page = tl.load(pages_ptr + b * sd_b + (j // BS) * sd_p, mask=j < keep, other=0).to(tl.int64)
    dst = cache_ptr + l * sc_l + h * sc_h + (page * sc_b + (j % BS) * sc_s)[:, None] + d[None, :]
    tl.store(dst, tl.load(buf_ptr + (blh * keep + j[:, None]) * D + d[None, :], mask=mask), mask=mask)


def compact_triton(cache: torch.Tensor, src_pages: torch.Tensor, n: int, idx: torch.Tensor,
                   dest_pages: torch.Tensor) -> None:
    """Same as compact_ref: compact_batched_triton with one request (the same kernels, compiled once)."""
    compact_batched_triton(cache, src_pages.unsqueeze(0), n, idx.unsqueeze(0), dest_pages.unsqueeze(0))


def compact_batched_triton(cache: torch.Tensor, src_pages: torch.Tensor, n: int, idx: torch.Tensor,
                           dest_pages: torch.Tensor) -> None:
    """Same as compact_batched_ref. A gather of every request's kept entries into scratch, then a parallel
    write: the second launch starts only after every read of the first, so dest pages may alias src pages
    in any order. Scratch: B * Lg * H_kv * keep * D elements of cache's dtype (D = 1 for scores)."""
    c = cache if cache.dim() == 5 else cache.unsqueeze(-1)
    lg, _, bs, h, d = c.shape
    B, keep = idx.shape[0], idx.shape[-1]
    assert c.stride(-1) == 1 or d == 1
    assert src_pages.shape[0] == dest_pages.shape[0] == B and idx.shape[1:3] == (lg, h)
    if keep == 0 or B == 0:
        return
    buf = _empty((B, lg, h, keep, d), c.dtype, c.device)
    BJ, BD = 64, triton.next_power_of_2(d)
    grid = (B * lg * h, triton.cdiv(keep, BJ))
    strides = c.stride()[:4]
    _compact_gather_kernel[grid](c, src_pages, idx, buf, keep, h, lg, bs, *strides, *src_pages.stride(), *idx.stride(),
                                 D=d, BJ=BJ, BD=BD)
    _compact_write_kernel[grid](c, dest_pages, buf, keep, h, lg, bs, *strides, *dest_pages.stride(), D=d, BJ=BJ, BD=BD)
