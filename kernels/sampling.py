"""Top-p (nucleus) truncation without sorting the vocabulary.

A row keeps the most likely tokens until the mass before the next one reaches top_p. What that decides is
one value per row: the smallest logit kept. Every token at or above it is kept (so tokens tied with the
last kept one are all kept, whatever order a sort would have put them in). Sorting a batch of rows of a
150k-token vocabulary to find it costs more than the model's own decode step leaves room for; a radix
search over the logits' bit patterns finds the same value in nine passes over each row, with no scratch.
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

    @functools.partial(triton.jit, do_not_specialize=["step"])  # one compile serves every pass
    def _chunk_mass_kernel(x_ptr, m_ptr, lo_ptr, mass_ptr, V, sx, C, step, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        """Grid (rows, chunks): for the 16 candidate keys lo + d * step, the chunk's mass sum(exp(x - m)) over
        the tokens whose key is above the candidate. The sums stay per lane until the chunk's end (one
        reduction per chunk, not one per block)."""
        row, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
        m = tl.load(m_ptr + row)
        cand = tl.load(lo_ptr + row) + tl.arange(0, 16).to(tl.int64) * step
        cand = tl.minimum(tl.maximum(cand, -2147483648), 2147483647).to(tl.int32)[None, :]
        acc = tl.zeros([BLOCK, 16], tl.float32)
        for v0 in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK):
            n = v0 + tl.arange(0, BLOCK)[:, None]  # loaded as a column: broadcast across the 16 candidates in place
            x = tl.load(x_ptr + row * sx + n, mask=n < V, other=float("-inf"))
            acc += tl.where(_key(x) > cand, tl.exp(x - m), 0.0)  # (exp is 0 past the row's end)
        tl.store(mass_ptr + (row * C + c) * 16 + tl.arange(0, 16), tl.sum(acc, 0))


def top_p_threshold_triton(logits: torch.Tensor, top_p: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Same as top_p_threshold_ref. Rows are cut into chunks so that a batch fills the GPU: one launch for
    each chunk's max and mass, then the largest key t with G(t) = (mass over keys > t) >= top_p * total,
    four bits per launch over the 32-bit keys (each weighs 16 candidates per chunk, the chunks' masses summed
    here); the threshold is the value of key t + 1, a key some token has. Scratch: rows x chunks x 16 fp32."""
    R, V = logits.shape
    assert chunk >= 16 and chunk & (chunk - 1) == 0, "chunk: a power of two"
    logits = logits.float().contiguous()
    top_p = top_p.float().contiguous()
    if R == 0:
        return torch.empty(0, dtype=torch.float32, device=logits.device)
    C = triton.cdiv(V, chunk)
    m_c = torch.empty(R, C, dtype=torch.float32, device=logits.device)
    s_c = torch.empty_like(m_c)
    _chunk_stats_kernel[(R, C)](logits, m_c, s_c, V, logits.stride(0), C, CHUNK=chunk, BLOCK=min(chunk, 1024),
                              num_warps=4)
    m = m_c.amax(1)
    target = top_p * (s_c * (m_c - m[:, None]).exp()).sum(1)
    lo = torch.full((R,), -2**31 - 1, dtype=torch.int64, device=logits.device)  # invariant: G(lo) >= target
    mass = torch.empty(R, C, 16, dtype=torch.float32, device=logits.device)
    for shift in range(28, -1, -4):
        _chunk_mass_kernel[(R, C)](logits, m, lo, mass, V, logits.stride(0), C, 1 << shift, CHUNK=chunk,
                                   BLOCK=min(chunk, 512), num_warps=4)
        lo += ((mass.sum(1) >= target[:, None]).sum(1) - 1) << shift  # masses fall with the candidate
    b = (lo + 1).to(torch.int32)  # the key back to its float (inverse of _key)
    out = torch.where(b < 0, b ^ 0x7FFFFFFF, b).view(torch.float32)
    return torch.where(top_p >= 1, torch.full_like(out, float("-inf")), out)
