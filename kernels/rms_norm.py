"""RMSNorm, optionally fused with the residual add that precedes it (one pass over the row).

Numerics follow the reference models exactly: the sum x + residual is rounded to the activation dtype
(it becomes the next residual), the normalisation runs in fp32 and is rounded to the activation dtype,
then multiplied by the weight and rounded again. The Triton kernel reproduces each rounding, so both
backends give bit-identical results in bf16.
"""

import torch
import triton
import triton.language as tl


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x: [..., N]; weight: [N]. Returns out, or (out, x + residual) when residual is given."""
    if residual is not None:
        x = x + residual
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, residual)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every output allocation goes through here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, r_out_ptr, s_x, s_r, s_o, s_ro, N, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * s_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(r_ptr + row * s_r + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(out_ptr.dtype.element_ty)
        tl.store(r_out_ptr + row * s_ro + cols, x, mask=mask)
    h = x.to(tl.float32)
    h = h * tl.math.rsqrt(tl.sum(h * h, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = (h.to(out_ptr.dtype.element_ty).to(tl.float32) * w).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * s_o + cols, out, mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Same contract as rms_norm_ref (weight and x of the same dtype)."""
    shape, n = x.shape, x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = _empty((rows, n), x.dtype, x.device)
    if residual is not None:
        r2 = residual.reshape(-1, n)
        r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
        r_out = _empty((rows, n), x.dtype, x.device)
    else:
        r2 = r_out = out  # unused
    if rows:
        _rms_norm_kernel[(rows,)](x2, r2, weight, out, r_out, x2.stride(0), r2.stride(0), out.stride(0),
                                  r_out.stride(0), n, eps, HAS_RESIDUAL=residual is not None,
                                  BLOCK=triton.next_power_of_2(n), num_warps=4 if n <= 2048 else 8)
    out = out.view(shape)
    return out if residual is None else (out, r_out.view(shape))
