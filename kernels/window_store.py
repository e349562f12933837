"""Write post-RoPE query rows into the per-request query window (a ring of the last Q queries),
which compression scoring reads later."""

import torch
import triton
import triton.language as tl


def store_q_window_ref(q: torch.Tensor, q_window: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                       pos: torch.Tensor) -> None:
    """q: [T, H_q, D]; q_window: [S, Q, H_q, D]; rows, slots, pos: [M] int64. q_window[slots, pos] = q[rows]."""
    q_window[slots, pos] = q[rows].to(q_window.dtype)


@triton.jit
def _store_q_window_kernel(q_ptr, win_ptr, rows_ptr, slots_ptr, pos_ptr, s_qt, s_qh, s_ws, s_wq, s_wh,
                           H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per written row: copy q[rows[i]] ([H_q, D]) to q_window[slots[i], pos[i]]."""
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i).to(tl.int64)
    dst = tl.load(slots_ptr + i).to(tl.int64) * s_ws + tl.load(pos_ptr + i).to(tl.int64) * s_wq
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < H) & (d < D)
    x = tl.load(q_ptr + row * s_qt + h * s_qh + d, mask=mask)
    tl.store(win_ptr + dst + h * s_wh + d, x.to(win_ptr.dtype.element_ty), mask=mask)


def store_q_window_triton(q: torch.Tensor, q_window: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                          pos: torch.Tensor) -> None:
    """Same contract as store_q_window_ref, in one launch (no gather copy of q)."""
    M, h, d = rows.shape[0], q.shape[1], q.shape[2]
    if M == 0:
        return
    assert q_window.stride(-1) == 1, "the window is written in place"
    if q.stride(-1) != 1:
        q = q.contiguous()
    _store_q_window_kernel[(M,)](q, q_window, rows, slots, pos, q.stride(0), q.stride(1), *q_window.stride()[:3],
                                 H=h, D=d, BLOCK_H=triton.next_power_of_2(h), BLOCK_D=triton.next_power_of_2(d),
                                 num_warps=4)
