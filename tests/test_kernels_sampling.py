"""Top-p thresholds: the Triton kernel (run by the interpreter on the CPU) against its torch reference, and
both against an independent float64 statement of the rule: a token is kept iff the mass of the tokens more
likely than it is below top_p."""

import pytest
import torch

from zipserve.kernels.sampling import top_p_threshold_ref, top_p_threshold_triton
from zipserve.workers.sampler import truncate_logits
from zipserve.workers.sampling_params import SamplingParams

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def kept_f64(logits: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept mask, margin): kept iff the float64 mass strictly above the token's value is < top_p; margin is
    how far top_p is from the nearest such mass of the row (decisions closer than rounding are not tested)."""
    p = logits.double().softmax(-1)
    above = torch.stack([(p * (logits > logits[:, j: j + 1])).sum(-1) for j in range(logits.shape[1])], 1)
    kept = (above < top_p.double()[:, None]) | (top_p >= 1)[:, None]
    margin = (above - top_p.double()[:, None]).abs().amin(-1)
    return kept, margin


def rows(R: int, V: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(R, 1, generator=g) * 6 + 0.1  # flat to peaked rows
    logits = torch.randn(R, V, generator=g) * scale
    logits[0, : V // 3] = float("-inf")  # a row already cut (top-k, bad words, grammar)
    logits[1, 5:9] = logits[1, 4]  # ties
    top_p = torch.rand(R, generator=g) * 0.98 + 0.01
    top_p[2] = 1.0
    top_p[3] = 0.999999
    return logits, top_p


@pytest.mark.parametrize("impl", [top_p_threshold_ref, top_p_threshold_triton], ids=["torch", "triton"])
@pytest.mark.parametrize("V", [37, 1000, 2500])
def test_threshold_keeps_exactly_the_nucleus(impl, V):
    logits, top_p = rows(12, V, seed=V)
    thr = impl(logits.to(DEV), top_p.to(DEV)).cpu()
    assert thr.shape == (12,) and not thr.isnan().any()
    kept, margin = kept_f64(logits, top_p)
    clear = margin > 1e-5
    assert clear.sum() >= 9
    assert torch.equal((logits >= thr[:, None])[clear], kept[clear])
    assert thr[2] == float("-inf")  # top_p = 1 cuts nothing
    assert (logits >= thr[:, None]).any(-1).all()  # the most likely token always stays


@pytest.mark.parametrize("chunk", [4096, 256, 64])
def test_triton_equals_reference(chunk):
    """Also with rows cut into many chunks, some of them all -inf (row 0's first third)."""
    logits, top_p = rows(16, 2500, seed=3)
    a = top_p_threshold_ref(logits.to(DEV), top_p.to(DEV)).cpu()
    b = top_p_threshold_triton(logits.to(DEV), top_p.to(DEV), chunk=chunk).cpu()
    _, margin = kept_f64(logits, top_p)
    clear = margin > 1e-5
    assert torch.equal(a[clear], b[clear])


def test_ties_at_the_cut_are_all_kept():
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0, -2.0]])
    p = logits.softmax(-1)[0]
    top_p = torch.tensor([float(p[0] + p[1] / 2)])  # the cut falls inside the tie
    for impl in (top_p_threshold_ref, top_p_threshold_triton):
        assert impl(logits.to(DEV), top_p.to(DEV)).item() == 1.0


def test_truncate_logits_top_k_and_top_p_together():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    params = [SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=0.5, top_p=0.6),
              SamplingParams(temperature=1.0, top_k=10, top_p=0.5), SamplingParams(temperature=1.0)]
    out = truncate_logits(logits.to(DEV), params).cpu()
    kept = out > float("-inf")
    assert kept[0].sum() == 5 and torch.equal(kept[0], logits[0] >= logits[0].topk(5).values[-1])
    k1, _ = kept_f64(logits[1:2] / 0.5, torch.tensor([0.6]))
    assert torch.equal(kept[1], k1[0])
    cut = logits[2].masked_fill(logits[2] < logits[2].topk(10).values[-1], float("-inf"))
    k2, _ = kept_f64(cut[None], torch.tensor([0.5]))
    assert torch.equal(kept[2], k2[0])
    assert kept[3].all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_vocabulary_sized_rows():
    """A serving batch's shape: 256 rows of a 151,936-token vocabulary from bf16 logits."""
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(256, 151936, device="cuda", generator=g) * torch.rand(256, 1, device="cuda", generator=g)
              * 8).bfloat16().float()  # bf16 values: many exact ties
    top_p = torch.rand(256, device="cuda", generator=g) * 0.98 + 0.01
    a, b = top_p_threshold_ref(logits, top_p), top_p_threshold_triton(logits, top_p)
    p = logits.double().softmax(-1)
    above_b = (p * (logits > b[:, None])).sum(-1)  # mass strictly above the kernel's last kept value
    at_b = (p * (logits >= b[:, None])).sum(-1)
    assert (above_b < top_p + 1e-5).all() and (at_b >= top_p - 1e-5).all()  # b is where the mass crosses top_p
    assert (a == b).float().mean() > 0.99
