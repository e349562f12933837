"""Top-p (nucleus) truncation without sorting the vocabulary.

A row keeps the most likely tokens until the mass before the next one reaches top_p. What that decides is
one value per row: the smallest logit kept. Every token at or above it is kept (so tokens tied with the
last kept one are all kept, whatever order a sort would have put them in). Sorting a batch of rows of a
150k-token vocabulary to find it costs more than the model's own decode step leaves room for; a radix
search over the logits' bit patterns finds the same value in nine passes over each row, with no scratch.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    from zipserve.kernels.compress import _orderable
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
    def _top_p_threshold_kernel(x_ptr, p_ptr, out_ptr, V, sx, BLOCK: tl.constexpr):
        """Grid (rows,). Pass 0: row max m and mass s = sum(exp(x - m)). Then the largest key t with
        G(t) = sum of exp(x - m) over keys > t at least top_p * s, four bits per pass over 32-bit keys (each
        pass weighs 16 candidates at once); the threshold is the value of key t + 1, a key some token has."""
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * sx
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        for v0 in range(0, V, BLOCK):
            n = v0 + tl.arange(0, BLOCK)
            x = tl.load(base + n, mask=n < V, other=float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        target = tl.load(p_ptr + row) * s
        digit = tl.arange(0, 16).to(tl.int64)
        lo = tl.full([], -1, tl.int64)  # invariant: G(lo) >= target > G(lo + 16 * step)
        step = tl.full([], 1 << 28, tl.int64)
        for _ in range(8):
            cand = lo + digit * step
            mass = tl.zeros([16], tl.float32)
            for v0 in range(0, V, BLOCK):
                n = v0 + tl.arange(0, BLOCK)
                x = tl.load(base + n, mask=n < V, other=float("-inf"))
                key = tl.where(n < V, _orderable(x), -1)
                e = tl.exp(x - m)
                mass += tl.sum(tl.where(key[:, None] > cand[None, :], e[:, None], 0.0), 0)
            lo += (tl.sum((mass >= target).to(tl.int64), 0) - 1) * step  # masses fall with the candidate
            step = step // 16
        b = (lo + 1 - 2147483648).to(tl.int32)  # the key back to its float (inverse of _orderable)
        bits = tl.where(b < 0, b ^ 0x7FFFFFFF, b)
        tl.store(out_ptr + row, bits.to(tl.float32, bitcast=True))


def top_p_threshold_triton(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Same as top_p_threshold_ref; one program per row, nine passes over it."""
    R, V = logits.shape
    logits = logits.float().contiguous()
    top_p = top_p.float().contiguous()
    out = torch.empty(R, dtype=torch.float32, device=logits.device)
    if R:
        _top_p_threshold_kernel[(R,)](logits, top_p, out, V, logits.stride(0), BLOCK=1024, num_warps=8)
    return torch.where(top_p >= 1, torch.full_like(out, float("-inf")), out)
