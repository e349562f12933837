"""Top-p (nucleus) truncation without sorting the vocabulary.

A row keeps the most likely tokens until the mass before the next one reaches top_p. What that decides is
one value per row: the smallest logit kept. Every token at or above it is kept (so tokens tied with the
last kept one are all kept, whatever order a sort would have put them in). Sorting a batch of rows of a
150k-token vocabulary to find it costs more than the model's own decode step leaves room for; a radix
search over the logits' bit patterns finds the same value in nine passes over each row, with no sort.

Sampling from the nucleus mostly needs no threshold at all (`sample_top_p`): a draw from the whole softmax
that lands in the nucleus S is a draw from the nucleus (p restricted to S, renormalised), and S holds at least
top_p of the mass, so at top_p 0.95 a draw is accepted 19 times in 20. Whether a draw is in S is one pass (the
mass strictly above its value is below top_p). Rows that miss twice fall back to the threshold and an inverse
CDF over S, so the result is exact whatever top_p is; only its cost grows as top_p falls.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the reference still works
    triton = tl = None


def top_p_threshold_ref(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits: [R, V] fp32 (temperature applied; -inf for tokens already excluded); top_p: [R] fp32 in (0, 1].
    Returns [R] fp32: the smallest logit a row keeps (-inf where top_p >= 1: nothing is cut)."""
    probs = logits.softmax(-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each rank
    kept = (before < top_p[:, None]).sum(-1).clamp(min=1)  # a prefix of the ranks: the first always stays
    last = logits.gather(1, order.gather(1, (kept - 1)[:, None])).squeeze(1)
    return torch.where(top_p >= 1, torch.full_like(last, float("-inf")), last)


DRAWS = 2  # draws from the whole softmax before a row falls back to the nucleus itself (u's columns: DRAWS + 1)


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[R] int64: per row, the first index whose cumulative weight exceeds u * the row's total (weights >= 0;
    a zero-weight token is never chosen)."""
    cdf = weights.cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(1).contiguous()
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=weights.shape[-1] - 1)


def sample_top_p_ref(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [R, V] (any float dtype; -inf for excluded tokens); temperature: [R] fp32 > 0; top_p: [R] fp32
    in (0, 1]; u: [R, DRAWS + 1] fp32 uniforms in [0, 1). Returns (tokens [R] int64, bad [R] bool: the row's
    distribution is not one: NaN, +inf or nothing left; its token is meaningless).

    Draw k (k < DRAWS) takes the inverse CDF of the whole softmax at u[:, k] and is accepted when the mass
    strictly above its value is below top_p (the nucleus rule of top_p_threshold_ref); a row with no accepted
    draw takes the inverse CDF of the nucleus (tokens at or above the threshold) at u[:, DRAWS]."""
    x = logits.float() / temperature[:, None]
    w = (x - x.amax(-1, keepdim=True)).exp()
    total = w.sum(-1)
    bad = ~(torch.isfinite(w).all(-1) & (total > 0) & torch.isfinite(total))
    w = w.masked_fill(bad[:, None], 1.0)  # (a bad row draws something harmless; the caller fails it)
    total = w.sum(-1)
    tokens = torch.zeros(len(x), dtype=torch.long, device=x.device)
    done = bad.clone()
    for k in range(DRAWS):
        j = inverse_cdf(w, u[:, k])
        above = (w * (x > x.gather(1, j[:, None]))).sum(-1)
        ok = ~done & (above < top_p * total)
        tokens = torch.where(ok, j, tokens)
        done |= ok
    rest = (~done).nonzero().squeeze(1)
    if len(rest):
        t = top_p_threshold_ref(x[rest], top_p[rest])
        tokens[rest] = inverse_cdf(w[rest] * (x[rest] >= t[:, None]), u[rest, DRAWS])
    return tokens, bad


if triton is not None:

    @triton.jit
    def _load_x(x_ptr, t_ptr, row, sx, n, V, SCALED: tl.constexpr):
        """Tokens n of a row as fp32 (-inf past its end), divided by the row's temperature when SCALED."""
        x = tl.load(x_ptr + row * sx + n, mask=n < V, other=float("-inf")).to(tl.float32)
        if SCALED:
            x = x / tl.load(t_ptr + row)
        return x

    @triton.jit
    def _chunk_stats_kernel(x_ptr, t_ptr, m_ptr, s_ptr, bad_ptr, V, sx, C, SCALED: tl.constexpr,
                            CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        """Grid (rows, chunks): each chunk's max m_c, sum(exp(x - m_c)) and count of NaN / +inf values."""
        row, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        bad = tl.zeros([], tl.int32)
        for v0 in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK):
            n = v0 + tl.arange(0, BLOCK)
            x = _load_x(x_ptr, t_ptr, row, sx, n, V, SCALED)
            bad += tl.sum(((x != x) | (x == float("inf"))).to(tl.int32), 0)
            m_new = tl.maximum(m, tl.max(x, 0))
            live = m_new > float("-inf")  # (a chunk cut away so far: nothing to add, and no -inf - -inf)
            s = s * tl.where(live, tl.exp(m - m_new), 0.0) + tl.sum(tl.where(live, tl.exp(x - m_new), 0.0), 0)
            m = m_new
        tl.store(m_ptr + row * C + c, m)
        tl.store(s_ptr + row * C + c, s)
        tl.store(bad_ptr + row * C + c, bad)

    @triton.jit
    def _key(x):
        """fp32 -> int32 with the same order (-0.0 made +0.0 so that it ties with +0.0)."""
        bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
        return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)

    @triton.jit
    def _row_stats(m_c_ptr, s_c_ptr, row, C, C_BLOCK: tl.constexpr):
        """A row's max m and total mass sum(exp(x - m)), from its chunks' stats."""
        cs = tl.arange(0, C_BLOCK)
        m_c = tl.load(m_c_ptr + row * C + cs, mask=cs < C, other=float("-inf"))
        s_c = tl.load(s_c_ptr + row * C + cs, mask=cs < C, other=0.0)
        m = tl.max(m_c, 0)
        return m, tl.sum(tl.where(m_c > float("-inf"), s_c * tl.exp(m_c - m), 0.0), 0)

    @triton.jit
    def _row_target(m_c_ptr, s_c_ptr, p_ptr, row, C, C_BLOCK: tl.constexpr):
        """A row's max m and the mass top_p * sum(exp(x - m)) its kept tokens must reach."""
        m, total = _row_stats(m_c_ptr, s_c_ptr, row, C, C_BLOCK)
        return m, tl.load(p_ptr + row) * total

    @triton.jit
    def _open(state_ptr, row, HAS_STATE: tl.constexpr):
        """Whether a row still needs this kernel (rows a draw settled are done: state != 0)."""
        live = tl.full([], 1, tl.int1)
        if HAS_STATE:
            live = tl.load(state_ptr + row) == 0
        return live

    @triton.jit
    def _advance(lo_ptr, mass_ptr, row, C, step, target, C_BLOCK: tl.constexpr):
        """lo after a pass that weighed the candidates lo + d * step: the largest d whose mass G (summed over
        the row's chunks) still reaches target (masses fall with the candidate; G(lo) >= target holds)."""
        cs = tl.arange(0, C_BLOCK)[:, None]
        mass = tl.load(mass_ptr + (row * C + cs) * 16 + tl.arange(0, 16)[None, :], mask=cs < C, other=0.0)
        count = tl.sum((tl.sum(mass, 0) >= target).to(tl.int64), 0)
        return tl.load(lo_ptr + row) + (count - 1) * step

    @functools.partial(triton.jit, do_not_specialize=["prev_step", "step"])  # one compile serves passes 2..8
    def _radix_pass_kernel(x_ptr, t_ptr, m_c_ptr, s_c_ptr, p_ptr, state_ptr, lo_in_ptr, mass_in_ptr, lo_out_ptr,
                           mass_out_ptr, V, sx, C, prev_step, step, FIRST: tl.constexpr, SCALED: tl.constexpr,
                           HAS_STATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, C_BLOCK: tl.constexpr):
        """Grid (rows, chunks). Each program first finishes the previous pass for its row (lo from that pass's
        masses: no launch in between), then, for the 16 candidate keys lo + d * step, sums its chunk's mass
        sum(exp(x - m)) over the tokens whose key is above the candidate. The sums stay per lane until the
        chunk's end (one reduction per chunk, not one per block). Chunk 0 records lo for the next pass."""
        row, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
        if _open(state_ptr, row, HAS_STATE):
            m, target = _row_target(m_c_ptr, s_c_ptr, p_ptr, row, C, C_BLOCK)
            if FIRST:
                lo = tl.full([], -2147483649, tl.int64)  # below every key: G(lo) is the whole mass
            else:
                lo = _advance(lo_in_ptr, mass_in_ptr, row, C, prev_step, target, C_BLOCK)
            if c == 0:
                tl.store(lo_out_ptr + row, lo)
            cand = lo + tl.arange(0, 16).to(tl.int64) * step
            cand = tl.minimum(tl.maximum(cand, -2147483648), 2147483647).to(tl.int32)[None, :]
            acc = tl.zeros([BLOCK, 16], tl.float32)
            for v0 in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK):
                n = v0 + tl.arange(0, BLOCK)[:, None]  # loaded as a column: broadcast across the 16 candidates
                x = _load_x(x_ptr, t_ptr, row, sx, n, V, SCALED)
                acc += tl.where(_key(x) > cand, tl.exp(x - m), 0.0)  # (exp is 0 past the row's end)
            tl.store(mass_out_ptr + (row * C + c) * 16 + tl.arange(0, 16), tl.sum(acc, 0))

    @triton.jit
    def _threshold_kernel(m_c_ptr, s_c_ptr, p_ptr, state_ptr, lo_in_ptr, mass_in_ptr, out_ptr, C, prev_step,
                          HAS_STATE: tl.constexpr, C_BLOCK: tl.constexpr):
        """Grid (rows,): the last pass's lo, then the threshold: the value of key lo + 1 (a key some token
        has), or -inf where top_p >= 1."""
        row = tl.program_id(0).to(tl.int64)
        if _open(state_ptr, row, HAS_STATE):
            m, target = _row_target(m_c_ptr, s_c_ptr, p_ptr, row, C, C_BLOCK)
            b = (_advance(lo_in_ptr, mass_in_ptr, row, C, prev_step, target, C_BLOCK) + 1).to(tl.int32)
            value = tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.float32, bitcast=True)  # the inverse of _key
            tl.store(out_ptr + row, tl.where(tl.load(p_ptr + row) >= 1.0, float("-inf"), value))

    @triton.jit
    def _inverse_cdf(x_ptr, t_ptr, row, sx, V, cmass, cs, target, m, floor, CHUNK: tl.constexpr,
                     BLOCK: tl.constexpr):
        """The first token whose cumulative weight exp(x - m) (tokens at or above `floor` only) exceeds target,
        given the chunks' weights cmass: the chunk from cmass, the token by a scan of that chunk alone. Where
        rounding leaves the scan short of target, the chunk's last weighted token."""
        cum = tl.cumsum(cmass, 0)
        c = tl.minimum(tl.sum((cum <= target).to(tl.int32), 0), tl.max(tl.where(cmass > 0, cs, -1), 0))
        rest = target - tl.sum(tl.where(cs < c, cmass, 0.0), 0)
        run = tl.zeros([], tl.float32)
        first = tl.full([], 2147483647, tl.int32)
        last = tl.full([], -1, tl.int32)
        for v0 in range(0, CHUNK, BLOCK):
            n = c * CHUNK + v0 + tl.arange(0, BLOCK)
            x = _load_x(x_ptr, t_ptr, row, sx, n, V, True)
            w = tl.where(x >= floor, tl.exp(x - m), 0.0)
            hit = (tl.cumsum(w, 0) + run > rest) & (w > 0)
            first = tl.minimum(first, tl.min(tl.where(hit, n, 2147483647), 0))
            last = tl.maximum(last, tl.max(tl.where(w > 0, n, -1), 0))
            run += tl.sum(w, 0)
        return tl.where(first < 2147483647, first, last)

    @triton.jit
    def _draw_kernel(x_ptr, t_ptr, m_c_ptr, s_c_ptr, bad_ptr, p_ptr, u_ptr, part_ptr, thr_ptr, tok_ptr, xj_ptr,
                     state_ptr, V, sx, C, K: tl.constexpr, DRAWS: tl.constexpr, CHUNK: tl.constexpr,
                     BLOCK: tl.constexpr, C_BLOCK: tl.constexpr):
        """Grid (rows,); state 0: open, 1: done, 2: bad (NaN / +inf / no mass: done, token meaningless).
        K = 0 marks bad rows; 0 < K <= DRAWS settles draw K - 1 (accepted when the chunks' masses above its
        value, in part, sum to below top_p of the row's mass); K < DRAWS draws token K from the whole
        softmax at u[K]; K = DRAWS + 1 draws the rows still open from the nucleus (weights at or above the
        threshold, chunk weights in part) at u[DRAWS]."""
        row = tl.program_id(0).to(tl.int64)
        cs = tl.arange(0, C_BLOCK)
        state = tl.load(state_ptr + row)
        m, total = _row_stats(m_c_ptr, s_c_ptr, row, C, C_BLOCK)
        if K == 0:
            bad = tl.sum(tl.load(bad_ptr + row * C + cs, mask=cs < C, other=0), 0)
            state = tl.where((bad > 0) | ~(total > 0) | (total == float("inf")), 2, state)
        if K > 0 and K <= DRAWS:
            above = tl.sum(tl.load(part_ptr + row * C + cs, mask=cs < C, other=0.0), 0)
            state = tl.where((state == 0) & (above < tl.load(p_ptr + row) * total), 1, state)
        tl.store(state_ptr + row, state)
        if K != DRAWS:
            if state == 0:
                _draw(x_ptr, t_ptr, m_c_ptr, s_c_ptr, u_ptr, part_ptr, thr_ptr, tok_ptr, xj_ptr, row, sx, V, C, m,
                      K, DRAWS, CHUNK, BLOCK, C_BLOCK)

    @triton.jit
    def _draw(x_ptr, t_ptr, m_c_ptr, s_c_ptr, u_ptr, part_ptr, thr_ptr, tok_ptr, xj_ptr, row, sx, V, C, m,
              K: tl.constexpr, DRAWS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
              C_BLOCK: tl.constexpr):
        """Draw K of an open row: from the whole softmax (K < DRAWS) or from the nucleus (K = DRAWS + 1)."""
        cs = tl.arange(0, C_BLOCK)
        if K < DRAWS:
            m_c = tl.load(m_c_ptr + row * C + cs, mask=cs < C, other=float("-inf"))
            s_c = tl.load(s_c_ptr + row * C + cs, mask=cs < C, other=0.0)
            cmass = tl.where(m_c > float("-inf"), s_c * tl.exp(m_c - m), 0.0)
            floor = float("-inf")
            u = tl.load(u_ptr + row * (DRAWS + 1) + K)
        else:
            cmass = tl.load(part_ptr + row * C + cs, mask=cs < C, other=0.0)
            floor = tl.load(thr_ptr + row)
            u = tl.load(u_ptr + row * (DRAWS + 1) + DRAWS)
        j = _inverse_cdf(x_ptr, t_ptr, row, sx, V, cmass, cs, u * tl.sum(cmass, 0), m, floor, CHUNK, BLOCK)
        tl.store(tok_ptr + row, j.to(tl.int64))
        tl.store(xj_ptr + row, _load_x(x_ptr, t_ptr, row, sx, j, V, True))

    @triton.jit
    def _chunk_mass_kernel(x_ptr, t_ptr, m_c_ptr, s_c_ptr, xj_ptr, thr_ptr, state_ptr, part_ptr, V, sx, C,
                           KEPT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, C_BLOCK: tl.constexpr):
        """Grid (rows, chunks), open rows: the chunk's mass sum(exp(x - m)) over the tokens above the row's
        draw (x > xj), or with KEPT over the nucleus (x >= threshold)."""
        row, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
        if tl.load(state_ptr + row) == 0:
            m, total = _row_stats(m_c_ptr, s_c_ptr, row, C, C_BLOCK)
            acc = tl.zeros([BLOCK], tl.float32)
            if KEPT:
                t = tl.load(thr_ptr + row)
                for v0 in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK):
                    x = _load_x(x_ptr, t_ptr, row, sx, v0 + tl.arange(0, BLOCK), V, True)
                    acc += tl.where(x >= t, tl.exp(x - m), 0.0)
            else:
                xj = tl.load(xj_ptr + row)
                for v0 in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK):
                    x = _load_x(x_ptr, t_ptr, row, sx, v0 + tl.arange(0, BLOCK), V, True)
                    acc += tl.where(x > xj, tl.exp(x - m), 0.0)
            tl.store(part_ptr + row * C + c, tl.sum(acc, 0))


def _threshold_passes(x, temperature, top_p, m_c, s_c, state, out, chunk: int, scaled: bool) -> None:
    """The radix search's nine launches (see top_p_threshold_triton) into out; rows whose state is not 0
    (when state is given) are skipped."""
    R, V = x.shape
    C = m_c.shape[1]
    C_BLOCK = max(16, triton.next_power_of_2(C))
    has_state = state is not None
    state = state if has_state else out  # (a pointer never read)
    lo = torch.empty(2, R, dtype=torch.int64, device=x.device)  # pass k reads lo[(k - 1) % 2], writes lo[k % 2]
    mass = torch.empty(2, R, C, 16, dtype=torch.float32, device=x.device)
    for k, shift in enumerate(range(28, -1, -4)):
        _radix_pass_kernel[(R, C)](x, temperature, m_c, s_c, top_p, state, lo[(k - 1) % 2], mass[(k - 1) % 2],
                                   lo[k % 2], mass[k % 2], V, x.stride(0), C, 1 << (shift + 4), 1 << shift,
                                   FIRST=k == 0, SCALED=scaled, HAS_STATE=has_state, CHUNK=chunk,
                                   BLOCK=min(chunk, 512), C_BLOCK=C_BLOCK, num_warps=4)
    _threshold_kernel[(R,)](m_c, s_c, top_p, state, lo[1], mass[1], out, C, 1, HAS_STATE=has_state,
                            C_BLOCK=C_BLOCK, num_warps=4)


def _chunk_stats(x, temperature, chunk: int, scaled: bool):
    R, V = x.shape
    C = triton.cdiv(V, chunk)
    m_c = torch.empty(R, C, dtype=torch.float32, device=x.device)
    s_c = torch.empty_like(m_c)
    bad = torch.empty(R, C, dtype=torch.int32, device=x.device)
    _chunk_stats_kernel[(R, C)](x, temperature, m_c, s_c, bad, V, x.stride(0), C, SCALED=scaled, CHUNK=chunk,
                                BLOCK=min(chunk, 1024), num_warps=4)
    return m_c, s_c, bad


def top_p_threshold_triton(logits: torch.Tensor, top_p: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Same as top_p_threshold_ref. Rows are cut into chunks so that a batch fills the GPU: one launch for
    each chunk's max and mass, then the largest key t with G(t) = (mass over keys > t) >= top_p * total,
    four bits per launch over the 32-bit keys (each weighs 16 candidates per chunk; the next launch sums the
    chunks' masses and picks), and a last launch for the value of key t + 1, a key some token has: ten
    launches, nothing between them. Scratch: 2 x rows x chunks x 16 fp32."""
    R, V = logits.shape
    assert chunk >= 16 and chunk & (chunk - 1) == 0, "chunk: a power of two"
    logits = logits.float().contiguous()
    top_p = top_p.float().contiguous()
    out = torch.empty(R, dtype=torch.float32, device=logits.device)
    if R == 0:
        return out
    m_c, s_c, _ = _chunk_stats(logits, top_p, chunk, scaled=False)
    _threshold_passes(logits, top_p, top_p, m_c, s_c, None, out, chunk, scaled=False)
    return out


def sample_top_p_triton(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor,
                        chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as sample_top_p_ref, read straight from the logits (any float dtype, temperature applied on
    load). Launches: chunk stats; per draw, the draw (one chunk scanned per row) and the mass above it;
    the settling of the last draw; then, for the rows both draws missed, the threshold's nine launches, the
    nucleus's chunk masses and its draw. The fallback's launches return at once for settled rows."""
    R, V = logits.shape
    assert chunk >= 16 and chunk & (chunk - 1) == 0, "chunk: a power of two"
    x = logits if logits.stride(1) == 1 else logits.contiguous()
    temperature, top_p, u = (t.float().contiguous() for t in (temperature, top_p, u))
    tokens = torch.zeros(R, dtype=torch.int64, device=x.device)
    state = torch.zeros(R, dtype=torch.int32, device=x.device)
    if R == 0:
        return tokens, state == 2
    m_c, s_c, bad = _chunk_stats(x, temperature, chunk, scaled=True)
    C = m_c.shape[1]
    C_BLOCK = max(16, triton.next_power_of_2(C))
    part = torch.empty(R, C, dtype=torch.float32, device=x.device)
    xj = torch.empty(R, dtype=torch.float32, device=x.device)
    thr = torch.empty(R, dtype=torch.float32, device=x.device)
    block = min(chunk, 1024)
    args = (x, temperature, m_c, s_c, bad, top_p, u, part, thr, tokens, xj, state, V, x.stride(0), C)
    for k in range(DRAWS + 1):
        _draw_kernel[(R,)](*args, K=k, DRAWS=DRAWS, CHUNK=chunk, BLOCK=block, C_BLOCK=C_BLOCK, num_warps=4)
        if k < DRAWS:
            _chunk_mass_kernel[(R, C)](x, temperature, m_c, s_c, xj, thr, state, part, V, x.stride(0), C,
                                       KEPT=False, CHUNK=chunk, BLOCK=block, C_BLOCK=C_BLOCK, num_warps=4)
    _threshold_passes(x, temperature, top_p, m_c, s_c, state, thr, chunk, scaled=True)
    _chunk_mass_kernel[(R, C)](x, temperature, m_c, s_c, xj, thr, state, part, V, x.stride(0), C,
                               KEPT=True, CHUNK=chunk, BLOCK=block, C_BLOCK=C_BLOCK, num_warps=4)
    _draw_kernel[(R,)](*args, K=DRAWS + 1, DRAWS=DRAWS, CHUNK=chunk, BLOCK=block, C_BLOCK=C_BLOCK, num_warps=4)
    return tokens, state == 2
