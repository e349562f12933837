"""Per-head q/k RMSNorm (Qwen3) and rotary embedding of q and k, fused into one pass per token.

RoPE uses the half-split layout and absolute positions (keys are stored after RoPE with their true
positions, never renumbered by compression). cos/sin are fp32 tables [max_positions, D/2] that already
include any attention factor (yarn). Rounding follows the reference models: the normalised head is
rounded to the activation dtype before the rotation, which runs in fp32.
"""

import torch
import triton
import triton.language as tl

from zipserve.kernels.rms_norm import rms_norm_ref


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def qk_norm_rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H_q, D], k: [T, H_kv, D] (any row strides); positions: [T] int; q_weight/k_weight: [D] or
    None (no q/k norm). Returns new contiguous (q, k)."""
    if q_weight is not None:
        q, k = rms_norm_ref(q, q_weight, eps), rms_norm_ref(k, k_weight, eps)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # [T, 1, D/2]
    return _rotate(q, c, s), _rotate(k, c, s)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every output allocation goes through here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _norm_rope_heads(x_ptr, out_ptr, w_ptr, c, s, t, s_xt, s_xh, s_ot, s_oh, H, eps,
                     NORM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Normalise (optionally) and rotate the [H, D] heads of token t."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = h < H
    src = x_ptr + t * s_xt + h * s_xh + d
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    dt = out_ptr.dtype.element_ty
    if NORM:
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        inv = tl.math.rsqrt((tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(w_ptr + d).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + d).to(tl.float32)
        x1 = ((f1 * inv).to(dt).to(tl.float32) * w1).to(dt)
        x2 = ((f2 * inv).to(dt).to(tl.float32) * w2).to(dt)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    dst = out_ptr + t * s_ot + h * s_oh + d
    tl.store(dst, (f1 * c - f2 * s).to(dt), mask=mask)
    tl.store(dst + HALF, (f2 * c + f1 * s).to(dt), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, q_out_ptr, k_out_ptr,
                         s_qt, s_qh, s_kt, s_kh, s_oqt, s_oqh, s_okt, s_okh, s_cos, H_Q, H_KV, eps,
                         NORM: tl.constexpr, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                         BLOCK_HKV: tl.constexpr):
    """One program per token: all its q and k heads."""
    t = tl.program_id(0).to(tl.int64)
    p = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF)[None, :]
    c = tl.load(cos_ptr + p * s_cos + d)
    s = tl.load(sin_ptr + p * s_cos + d)
    _norm_rope_heads(q_ptr, q_out_ptr, qw_ptr, c, s, t, s_qt, s_qh, s_oqt, s_oqh, H_Q, eps, NORM, HALF, BLOCK_HQ)
    _norm_rope_heads(k_ptr, k_out_ptr, kw_ptr, c, s, t, s_kt, s_kh, s_okt, s_okh, H_KV, eps, NORM, HALF, BLOCK_HKV)


def qk_norm_rope_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as qk_norm_rope_ref (head_dim a power of two)."""
    T, h_q, d = q.shape
    h_kv = k.shape[1]
    assert d & (d - 1) == 0 and q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1
    q_out, k_out = _empty((T, h_q, d), q.dtype, q.device), _empty((T, h_kv, d), k.dtype, k.device)
    if T:
        norm = q_weight is not None
        _qk_norm_rope_kernel[(T,)](q, k, positions, cos, sin, q_weight if norm else cos, k_weight if norm else cos,
                                   q_out, k_out, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                   q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
                                   cos.stride(0), h_q, h_kv, eps, NORM=norm, HALF=d // 2,
                                   BLOCK_HQ=triton.next_power_of_2(h_q), BLOCK_HKV=triton.next_power_of_2(h_kv),
                                   num_warps=4)
    return q_out, k_out
