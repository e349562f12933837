"""Top-p (nucleus) truncation without sorting the vocabulary.

A row keeps the most likely tokens until the mass before the next one reaches top_p. What that decides is
one value per row: the smallest logit kept. Every token at or above it is kept (so tokens tied with the
last kept one are all kept, whatever order a sort would have put them in). Sorting a batch of rows of a
150k-token vocabulary to find it costs more than the model's own decode step leaves room for; a radix
search over the logits' bit patterns finds the same value in nine passes over each row, with no sort.
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


if triton is not None:

    @triton.jit
    def _chunk_stats_kernel(x_ptr, m_ptr, s_ptr, V, sx, C, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        """Grid (rows, chunks): each chunk's max m_c and sum(exp(x - m_c))."""
        row, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        for v0 in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK):
            n = v0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * sx + n, mask=n < V, other=float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 0))
            live = m_new > float("-inf")  # (a chunk cut away so far: nothing to add, and no -inf - -inf)
            s = s * tl.where(live, tl.exp(m - m_new), 0.0) + tl.sum(tl.where(live, tl.exp(x - m_new), 0.0), 0)
            m = m_new
        tl.store(m_ptr + row * C + c, m)
        tl.store(s_ptr + row * C + c, s)

    @triton.jit
    def _key(x):
        """fp32 -> int32 with the same order (-0.0 made +0.0 so that it ties with +0.0)."""
        bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
        return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)

    @triton.jit
    def _row_target(m_c_ptr, s_c_ptr, p_ptr, row, C, C_BLOCK: tl.constexpr):
        """A row's max m and the mass top_p * sum(exp(x - m)) its kept tokens must reach, from chunk stats."""
        cs = tl.arange(0, C_BLOCK)
        m_c = tl.load(m_c_ptr + row * C + cs, mask=cs < C, other=float("-inf"))
        s_c = tl.load(s_c_ptr + row * C + cs, mask=cs < C, other=0.0)
        m = tl.max(m_c, 0)
        total = tl.sum(tl.where(m_c > float("-inf"), s_c * tl.exp(m_c - m), 0.0), 0)
        return m, tl.load(p_ptr + row) * total

    @triton.jit
    def _advance(lo_ptr, mass_ptr, row, C, step, target, C_BLOCK: tl.constexpr):
        """lo after a pass that weighed the candidates lo + d * step: the largest d whose mass G (summed over
        the row's chunks) still reaches target (masses fall with the candidate; G(lo) >= target holds)."""
        cs = tl.arange(0, C_BLOCK)[:, None]
        mass = tl.load(mass_ptr + (row * C + cs) * 16 + tl.arange(0, 16)[None, :], mask=cs < C, other=0.0)
        count = tl.sum((tl.sum(mass, 0) >= target).to(tl.int64), 0)
        return tl.load(lo_ptr + row) + (count - 1) * step

    @functools.partial(triton.jit, do_not_specialize=["prev_step", "step"])  # one compile serves passes 2..8
    def _radix_pass_kernel(x_ptr, m_c_ptr, s_c_ptr, p_ptr, lo_in_ptr, mass_in_ptr, lo_out_ptr, mass_out_ptr,
                           V, sx, C, prev_step, step, FIRST: tl.constexpr, CHUNK: tl.constexpr,
                           BLOCK: tl.constexpr, C_BLOCK: tl.constexpr):
        """Grid (rows, chunks). Each program first finishes the previous pass for its row (lo from that pass's
        masses: no launch in between), then, for the 16 candidate keys lo + d * step, sums its chunk's mass
        sum(exp(x - m)) over the tokens whose key is above the candidate. The sums stay per lane until the
        chunk's end (one reduction per chunk, not one per block). Chunk 0 records lo for the next pass."""
        row, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
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
            n = v0 + tl.arange(0, BLOCK)[:, None]  # loaded as a column: broadcast across the 16 candidates in place
            x = tl.load(x_ptr + row * sx + n, mask=n < V, other=float("-inf"))
            acc += tl.where(_key(x) > cand, tl.exp(x - m), 0.0)  # (exp is 0 past the row's end)
        tl.store(mass_out_ptr + (row * C + c) * 16 + tl.arange(0, 16), tl.sum(acc, 0))

    @triton.jit
    def _threshold_kernel(m_c_ptr, s_c_ptr, p_ptr, lo_in_ptr, mass_in_ptr, out_ptr, C, prev_step,
                          C_BLOCK: tl.constexpr):
        """Grid (rows,): the last pass's lo, then the threshold: the value of key lo + 1 (a key some token
        has), or -inf where top_p >= 1."""
        row = tl.program_id(0).to(tl.int64)
        m, target = _row_target(m_c_ptr, s_c_ptr, p_ptr, row, C, C_BLOCK)
        b = (_advance(lo_in_ptr, mass_in_ptr, row, C, prev_step, target, C_BLOCK) + 1).to(tl.int32)
        value = tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.float32, bitcast=True)  # the inverse of _key
        tl.store(out_ptr + row, tl.where(tl.load(p_ptr + row) >= 1.0, float("-inf"), value))


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
    C = triton.cdiv(V, chunk)
    C_BLOCK = max(16, triton.next_power_of_2(C))
    m_c = torch.empty(R, C, dtype=torch.float32, device=logits.device)
    s_c = torch.empty_like(m_c)
    _chunk_stats_kernel[(R, C)](logits, m_c, s_c, V, logits.stride(0), C, CHUNK=chunk, BLOCK=min(chunk, 1024),
                              num_warps=4)
    lo = torch.empty(2, R, dtype=torch.int64, device=logits.device)  # pass k reads lo[(k - 1) % 2], writes lo[k % 2]
    mass = torch.empty(2, R, C, 16, dtype=torch.float32, device=logits.device)
    for k, shift in enumerate(range(28, -1, -4)):
        _radix_pass_kernel[(R, C)](logits, m_c, s_c, top_p, lo[(k - 1) % 2], mass[(k - 1) % 2], lo[k % 2],
                                   mass[k % 2], V, logits.stride(0), C, 1 << (shift + 4), 1 << shift,
                                   FIRST=k == 0, CHUNK=chunk, BLOCK=min(chunk, 512), C_BLOCK=C_BLOCK, num_warps=4)
    _threshold_kernel[(R,)](m_c, s_c, top_p, lo[1], mass[1], out, C, 1, C_BLOCK=C_BLOCK, num_warps=4)
    return out
