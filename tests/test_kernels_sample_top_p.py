"""Nucleus sampling by rejection (kernels/sampling.py sample_top_p_*): the Triton kernels (run by the
interpreter on the CPU) draw the same tokens as the torch reference from the same uniforms, both follow a
float64 statement of the same draws, and the reference's tokens have the nucleus distribution (the float64
rule of tests/test_kernels_sampling.py, renormalised)."""

import pytest
import torch

from zipserve.kernels.sampling import DRAWS, sample_top_p_ref, sample_top_p_triton, top_p_threshold_ref
from tests.test_kernels_sampling import kept_f64, rows

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def draws_f64(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor):
    """(tokens, margin) in float64: draw k from the whole softmax at u[k], kept when the mass strictly above
    its value is below top_p; else the nucleus's own inverse CDF at u[DRAWS]. margin: the smallest relative
    distance of a decision the row took (a target to a CDF step, a mass to top_p); rounding may flip closer
    ones, so they are not compared."""
    x = logits.double() / temperature.double()[:, None]
    p = x.softmax(-1)
    kept, _ = kept_f64(x, top_p)
    tokens, margins = [], []
    for r in range(len(x)):
        margin, tok = float("inf"), None
        for k in range(DRAWS):
            cdf = p[r].cumsum(0)
            j = int((cdf <= u[r, k].double()).sum().clamp(max=len(cdf) - 1))
            margin = min(margin, float((cdf - u[r, k]).abs().min()))
            above = float((p[r] * (x[r] > x[r, j])).sum())
            margin = min(margin, abs(above - float(top_p[r])))
            if above < top_p[r]:
                tok = j
                break
        if tok is None:
            q = p[r] * kept[r]
            cdf = q.cumsum(0) / q.sum()
            tok = int((cdf <= u[r, DRAWS].double()).sum().clamp(max=len(cdf) - 1))
            margin = min(margin, float((cdf - u[r, DRAWS]).abs().min()))
        tokens.append(tok)
        margins.append(margin)
    return torch.tensor(tokens), torch.tensor(margins)


def batch(R: int, V: int, seed: int):
    logits, top_p = rows(R, V, seed)
    g = torch.Generator().manual_seed(seed + 1)
    temperature = torch.rand(R, generator=g) * 1.5 + 0.2
    u = torch.rand(R, DRAWS + 1, generator=g)
    return logits, temperature, top_p, u


@pytest.mark.parametrize("impl", [sample_top_p_ref, sample_top_p_triton], ids=["torch", "triton"])
@pytest.mark.parametrize("V,chunk", [(37, 4096), (1000, 4096), (2500, 64)])
def test_draws_follow_the_float64_statement(impl, V, chunk):
    """Rows cut into one or many chunks (some all -inf: row 0's first third), ties, top_p 1 and near 1, low
    top_p (most draws rejected: the nucleus fallback)."""
    logits, temperature, top_p, u = batch(24, V, seed=V)
    kwargs = {"chunk": chunk} if impl is sample_top_p_triton else {}
    tokens, bad = impl(logits.to(DEV), temperature.to(DEV), top_p.to(DEV), u.to(DEV), **kwargs)
    want, margin = draws_f64(logits, temperature, top_p, u)
    clear = margin > 1e-5
    assert clear.sum() >= 20
    assert not bad.any()
    assert torch.equal(tokens.cpu()[clear], want[clear])
    kept, _ = kept_f64(logits.double() / temperature.double()[:, None], top_p)
    assert kept[torch.arange(24), tokens.cpu()][clear].all()  # every token from its row's nucleus


def test_low_top_p_takes_the_fallback():
    """top_p 0.02 on flat rows: draws are almost always rejected, so the tokens come from the nucleus's own
    inverse CDF (u[:, DRAWS]); they still equal the float64 statement."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(16, 300, generator=g) * 0.3
    temperature, top_p = torch.ones(16), torch.full((16,), 0.02)
    u = torch.rand(16, DRAWS + 1, generator=g)
    want, margin = draws_f64(logits, temperature, top_p, u)
    for impl in (sample_top_p_ref, sample_top_p_triton):
        tokens, _ = impl(logits.to(DEV), temperature.to(DEV), top_p.to(DEV), u.to(DEV))
        assert torch.equal(tokens.cpu()[margin > 1e-5], want[margin > 1e-5])
    x = logits.double()
    assert ((x.softmax(-1) * (x > x.gather(1, want[:, None]))).sum(-1) < 0.02).all()


@pytest.mark.parametrize("impl", [sample_top_p_ref, sample_top_p_triton], ids=["torch", "triton"])
def test_bad_rows_are_flagged(impl):
    logits = torch.randn(5, 70)
    logits[1, 3] = float("nan")
    logits[2, 9] = float("inf")
    logits[3] = float("-inf")  # nothing left to draw
    logits[4, :69] = float("-inf")  # one token left: not bad
    t, p, u = torch.ones(5), torch.full((5,), 0.9), torch.rand(5, DRAWS + 1)
    tokens, bad = impl(logits.to(DEV), t.to(DEV), p.to(DEV), u.to(DEV))
    assert bad.cpu().tolist() == [False, True, True, True, False]
    assert tokens[4].item() == 69


def test_bf16_logits_read_directly():
    """The kernel reads bf16 logits and applies the temperature on load: same tokens as the reference on
    the same values."""
    logits, temperature, top_p, u = batch(12, 500, seed=11)
    logits = logits.bfloat16()
    a, _ = sample_top_p_ref(logits.to(DEV), temperature.to(DEV), top_p.to(DEV), u.to(DEV))
    b, _ = sample_top_p_triton(logits.to(DEV), temperature.to(DEV), top_p.to(DEV), u.to(DEV))
    _, margin = draws_f64(logits.float(), temperature, top_p, u)
    clear = margin > 1e-5
    assert clear.sum() >= 9 and torch.equal(a.cpu()[clear], b.cpu()[clear])


@pytest.mark.parametrize("top_p", [0.9, 0.3])
def test_reference_has_the_nucleus_distribution(top_p):
    """20,000 draws of one row: token frequencies match the float64 nucleus probabilities (within 5 standard
    errors each), and no token outside the nucleus is ever drawn."""
    g = torch.Generator().manual_seed(7)
    row = torch.randn(1, 30, generator=g) * 1.5
    n = 20000
    u = torch.rand(n, DRAWS + 1, generator=g)
    tokens, _ = sample_top_p_ref(row.expand(n, -1), torch.full((n,), 0.8), torch.full((n,), top_p), u)
    x = row.double() / 0.8
    kept, _ = kept_f64(x, torch.tensor([top_p]))
    q = x.softmax(-1)[0] * kept[0]
    q = q / q.sum()
    freq = torch.bincount(tokens, minlength=30).double() / n
    assert (freq[~kept[0]] == 0).all()
    se = (q * (1 - q) / n).sqrt()
    assert ((freq - q).abs() <= 5 * se + 1e-12).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_serving_batch_distribution():
    """256 rows of a 151,936-token vocabulary, bf16: every token from its nucleus, and over 64 batches of one
    repeated row the kernel's frequencies of the 20 likeliest tokens match the float64 nucleus."""
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(256, 151936, device="cuda", generator=g) * 3).bfloat16()
    t, p = torch.full((256,), 0.6, device="cuda"), torch.full((256,), 0.95, device="cuda")
    x = logits.double() / 0.6
    probs = x.softmax(-1)
    counts = torch.zeros(151936, dtype=torch.float64, device="cuda")
    for i in range(64):
        u = torch.rand(256, DRAWS + 1, device="cuda", generator=g)
        tokens, bad = sample_top_p_triton(logits, t, p, u)
        assert not bad.any()
        above = (probs * (x > x.gather(1, tokens[:, None]))).sum(-1)
        assert (above < 0.95 + 1e-6).all()  # in its row's nucleus
        one, _ = sample_top_p_triton(logits[:1].expand(256, -1), t, p, u)
        counts += torch.bincount(one, minlength=151936).double()
    kept = x[0] >= top_p_threshold_ref(x[:1], torch.tensor([0.95], device="cuda", dtype=torch.float64))
    q = probs[0] * kept
    q = q / q.sum()
    top = q.topk(20).indices
    n = counts.sum()
    se = (q[top] * (1 - q[top]) / n).sqrt()
    assert ((counts[top] / n - q[top]).abs() <= 5 * se).all()
