"""Copy runs of elements between the GPU and pinned host memory (recall's pages), gathered or scattered.

A recall moves many small pages (one layer and KV head each) between the host pool and the device. As
host-side gathers plus copies, each batch costs a CPU copy and a synchronous transfer; the Triton kernel
instead reads or writes pinned host memory directly (mapped into the GPU's address space), run by run,
in stream order, with no host copy and no wait.
"""

import torch
import triton
import triton.language as tl


def copy_runs_ref(dst: torch.Tensor, src: torch.Tensor, dst_at: torch.Tensor, src_at: torch.Tensor,
                  length: int) -> None:
    """For each i: dst.flatten()[dst_at[i] : dst_at[i] + length] = src.flatten()[src_at[i] : ... + length].
    dst and src are contiguous, of one dtype, each on the host or the device; dst_at, src_at: int64 [N]
    element offsets (runs of dst do not overlap)."""
    if not dst_at.numel() or length <= 0:
        return
    step = torch.arange(length, device=src_at.device)
    values = src.view(-1)[(src_at[:, None] + step).to(src.device)]
    dst.view(-1)[(dst_at[:, None] + step.to(dst_at.device)).to(dst.device)] = values.to(dst.device)


@triton.jit
def _copy_runs_kernel(dst_ptr, src_ptr, dst_at_ptr, src_at_ptr, length, BLOCK: tl.constexpr):
    """Grid (runs, blocks of a run): one block of one run."""
    i, b = tl.program_id(0), tl.program_id(1)
    j = b * BLOCK + tl.arange(0, BLOCK)
    d0 = tl.load(dst_at_ptr + i)
    s0 = tl.load(src_at_ptr + i)
    x = tl.load(src_ptr + s0 + j, mask=j < length)
    tl.store(dst_ptr + d0 + j, x, mask=j < length)


def copy_runs_triton(dst: torch.Tensor, src: torch.Tensor, dst_at: torch.Tensor, src_at: torch.Tensor,
                     length: int) -> None:
    """Same as copy_runs_ref; the offsets live on the device the kernel runs on (on CUDA, a pinned host
    tensor is read or written in place)."""
    assert dst.dtype == src.dtype and dst.is_contiguous() and src.is_contiguous()
    assert dst_at.dtype == src_at.dtype == torch.int64 and dst_at.is_contiguous() and src_at.is_contiguous()
    if not dst_at.numel() or length <= 0:
        return
    BLOCK = min(4096, triton.next_power_of_2(length))
    _copy_runs_kernel[(dst_at.numel(), triton.cdiv(length, BLOCK))](dst, src, dst_at, src_at, length, BLOCK=BLOCK)
