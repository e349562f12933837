"""Fused elementwise kernels (RMSNorm [+ residual], q/k-norm + RoPE, SiLU-and-mul) against their
plain-torch references.

CPU runs use the Triton interpreter in fp32/fp16 (small shapes); `gpu` runs use bf16 at real shapes and
require bit-identical results, since the kernels reproduce the references' roundings. Outputs are
poisoned with NaN before each run, inputs are fresh random draws (seed in the failure message), and
q/k come in as strided views of one fused qkv row, as the model passes them.
"""

import inspect
import random

import pytest
import torch

import zipserve.kernels.activation as act
import zipserve.kernels.rms_norm as rn
import zipserve.kernels.rope as rope
from zipserve.workers.layers.rotary import rope_inv_freq


@pytest.fixture
def poisoned(monkeypatch):
    nan = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)  # noqa: E731
    for mod in (act, rn, rope):
        monkeypatch.setattr(mod, "_empty", nan)


def _seed() -> int:
    seed = random.randrange(1 << 30)
    torch.manual_seed(seed)
    return seed


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _close(got, want, dtype, seed, exact=False):
    assert not got.isnan().any(), f"seed {seed}: NaN (unwritten output)"
    if exact:
        assert torch.equal(got, want), f"seed {seed}: max diff {(got.float() - want.float()).abs().max()}"
    else:
        # fp16: a few ulps. bf16: a changed fp32 rounding flips one bf16 ulp (2^-8 relative), and RoPE's
        # difference x1 cos - x2 sin can cancel, so the bound is also absolute: 3 ulps at unit scale.
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
        atol = 0.05 if dtype == torch.bfloat16 else tol
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=tol, msg=lambda m: f"seed {seed}: {m}")


def test_signatures_match_references():
    for ref, tri in ((rn.rms_norm_ref, rn.rms_norm_triton), (rope.qk_norm_rope_ref, rope.qk_norm_rope_triton),
                     (act.silu_and_mul_ref, act.silu_and_mul_triton)):
        assert inspect.signature(ref) == inspect.signature(tri), ref.__name__


def _rms_case(rows, n, dtype, residual, dev):
    seed = _seed()
    x = (3 * torch.randn(rows, n, device=dev)).to(dtype)
    w = (1 + 0.5 * torch.randn(n, device=dev)).to(dtype)
    r = torch.randn(rows, n, device=dev).to(dtype) if residual else None
    want = rn.rms_norm_ref(x, w, 1e-6, r)
    got = rn.rms_norm_triton(x, w, 1e-6, r)
    return seed, got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("rows, n", [(1, 64), (5, 96), (3, 128)])
def test_rms_norm_cpu(poisoned, rows, n, residual, dtype):
    seed, got, want = _rms_case(rows, n, dtype, residual, "cpu")
    if residual:
        _close(got[0], want[0], dtype, seed)
        _close(got[1], want[1], dtype, seed, exact=True)  # the sum is one rounding either way
    else:
        _close(got, want, dtype, seed)


def _qkv(T, h_q, h_kv, d, dtype, dev):
    """q and k as strided views of one fused qkv projection output."""
    qkv = (2 * torch.randn(T, (h_q + 2 * h_kv) * d, device=dev)).to(dtype)
    q, k, _ = qkv.split([h_q * d, h_kv * d, h_kv * d], dim=-1)
    return q.view(T, h_q, d), k.view(T, h_kv, d)


def _rope_case(T, h_q, h_kv, d, dtype, norm, scaling, dev):
    seed = _seed()
    q, k = _qkv(T, h_q, h_kv, d, dtype, dev)
    inv, factor = rope_inv_freq(d, 1e6, scaling)
    freqs = torch.outer(torch.arange(4096, dtype=torch.float32), inv).to(dev)
    cos, sin = freqs.cos() * factor, freqs.sin() * factor
    positions = torch.randint(0, 4096, (T,), device=dev)
    qw = (1 + 0.3 * torch.randn(d, device=dev)).to(dtype) if norm else None
    kw = (1 + 0.3 * torch.randn(d, device=dev)).to(dtype) if norm else None
    want = rope.qk_norm_rope_ref(q, k, positions, cos, sin, qw, kw, 1e-6)
    got = rope.qk_norm_rope_triton(q, k, positions, cos, sin, qw, kw, 1e-6)
    return seed, got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("norm", [True, False], ids=["qk-norm", "no-norm"])
@pytest.mark.parametrize("T, h_q, h_kv, d, scaling", [
    (3, 4, 2, 16, None), (5, 6, 3, 32, None),  # head counts that are not powers of two
    (2, 4, 4, 16, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024})])
def test_qk_norm_rope_cpu(poisoned, T, h_q, h_kv, d, scaling, norm, dtype):
    seed, (q, k), (q_ref, k_ref) = _rope_case(T, h_q, h_kv, d, dtype, norm, scaling, "cpu")
    _close(q, q_ref, dtype, seed)
    _close(k, k_ref, dtype, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T, i", [(1, 16), (4, 48), (3, 2500)])  # 2500: several column blocks, ragged end
def test_silu_and_mul_cpu(poisoned, T, i, dtype):
    seed = _seed()
    x = (3 * torch.randn(T, 2 * i)).to(dtype)
    _close(act.silu_and_mul_triton(x), act.silu_and_mul_ref(x), dtype, seed)


def test_empty_inputs(poisoned):
    x = torch.zeros(0, 32)
    assert rn.rms_norm_triton(x, torch.ones(32), 1e-6).shape == (0, 32)
    assert act.silu_and_mul_triton(torch.zeros(0, 32)).shape == (0, 16)


# ---------------------------------------------------------------- GPU, bf16, real shapes: bit-identical

@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 128, 4096])
@pytest.mark.parametrize("n", [2048, 4096, 5120])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_gpu(poisoned, rows, n, residual):
    seed, got, want = _rms_case(rows, n, torch.bfloat16, residual, "cuda")
    for g, w in zip(got, want) if residual else [(got, want)]:
        # The fp32 reduction order differs (tree vs torch's), which can flip one rounding in rare rows.
        mismatch = (g != w).float().mean().item()
        assert mismatch < 1e-3, f"seed {seed}: {mismatch:.2%} of elements differ"
        _close(g, w, torch.bfloat16, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 256, 8192])
@pytest.mark.parametrize("h_q, h_kv", [(32, 8), (16, 4), (40, 8)])
@pytest.mark.parametrize("norm", [True, False], ids=["qk-norm", "no-norm"])
def test_qk_norm_rope_gpu(poisoned, T, h_q, h_kv, norm):
    seed, got, want = _rope_case(T, h_q, h_kv, 128, torch.bfloat16, norm, None, "cuda")
    for g, w in zip(got, want):
        mismatch = (g != w).float().mean().item()
        assert mismatch < 1e-3, f"seed {seed}: {mismatch:.2%} of elements differ"
        _close(g, w, torch.bfloat16, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 128, 4096])
@pytest.mark.parametrize("i", [6144, 12288])
def test_silu_and_mul_gpu(poisoned, T, i):
    seed = _seed()
    x = (3 * torch.randn(T, 2 * i, device="cuda")).to(torch.bfloat16)
    got, want = act.silu_and_mul_triton(x), act.silu_and_mul_ref(x)
    mismatch = (got != want).float().mean().item()  # exp may differ in the last fp32 bit
    assert mismatch < 1e-3, f"seed {seed}: {mismatch:.2%} of elements differ"
    _close(got, want, torch.bfloat16, seed)
