"""copy_runs (recall's page moves) against an element-by-element oracle: runs gathered from and scattered
into a pool, every dtype the host store holds, partial pages, runs longer than one block. On CUDA the
`gpu` case reads and writes pinned host memory from the kernel (the store's real path)."""

import pytest
import torch

from zipserve.kernels.host_copy import copy_runs_ref, copy_runs_triton


def _oracle(dst, src, dst_at, src_at, length):
    out, flat = dst.clone().view(-1), src.view(-1).cpu()
    for d, s in zip(dst_at.tolist(), src_at.tolist()):
        for j in range(length):
            out[d + j] = flat[s + j]
    return out.view(dst.shape)


CASES = [  # dtype, pool pages, page elements, runs, run length, offset in the page
    (torch.bfloat16, 9, 64, 5, 64, 0),
    (torch.float32, 7, 48, 4, 20, 17),
    (torch.int64, 6, 16, 3, 16, 0),
    (torch.bfloat16, 4, 9000, 3, 8999, 1),  # longer than one block
]


@pytest.mark.parametrize("fn", [copy_runs_ref, copy_runs_triton], ids=["ref", "triton"])
@pytest.mark.parametrize("dtype,pages,page,runs,length,off", CASES)
def test_gather_and_scatter_equal_the_oracle(fn, dtype, pages, page, runs, length, off):
    g = torch.Generator().manual_seed(pages * page + runs)
    pool = (torch.randn(pages, page, generator=g) * 1000).to(dtype)
    ids = torch.randperm(pages, generator=g)[:runs]
    # gather: whole runs of pages into a packed buffer (poisoned first: every element must be written)
    out = torch.full((runs, length), -7, dtype=dtype)
    to, at = torch.arange(runs) * length, ids * page + off
    want = _oracle(out, pool, to, at, length)
    fn(out, pool, to, at, length)
    assert torch.equal(out, want)
    # scatter: packed rows into pages from an offset; the rest of the pool stays as it was
    src = (torch.randn(runs, length, generator=g) * 1000).to(dtype)
    want = _oracle(pool, src, at, to, length)
    fn(pool, src, at, to, length)
    assert torch.equal(pool, want)


def test_no_runs_is_a_no_op():
    pool = torch.arange(12.0).view(3, 4)
    for fn in (copy_runs_ref, copy_runs_triton):
        fn(pool, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 4)
        assert torch.equal(pool, torch.arange(12.0).view(3, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernel_reads_and_writes_pinned_host_memory():
    pool = (torch.randn(64, 2, 256, 128) * 100).to(torch.bfloat16).pin_memory()
    before = pool.clone()
    ids = torch.tensor([5, 0, 63, 17], device="cuda")
    n, page = ids.numel(), 2 * 256 * 128
    out = torch.empty(n, 2, 256, 128, dtype=torch.bfloat16, device="cuda")
    to = torch.arange(n, device="cuda") * page
    copy_runs_triton(out, pool, to, ids * page, page)
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), before[ids.cpu()])
    src = torch.randn(n, 2, 256, 128, device="cuda").to(torch.bfloat16)
    copy_runs_triton(pool, src, ids * page + 3 * 128, to + 3 * 128, page - 3 * 128)  # from slot 3 of K on
    torch.cuda.synchronize()
    want = before.clone().view(64, -1)
    want[ids.cpu(), 3 * 128:] = src.cpu().view(n, -1)[:, 3 * 128:]
    assert torch.equal(pool.view(64, -1), want)
