"""The kernel set a backend runs: the model's kernels (attention path, fused elementwise ops), the
compressor's (scores, selection, compaction) and the sampler's (top-p threshold, nucleus draw). The one table of backends.

`backend="torch"` runs every plain-torch reference; `backend="triton"` runs the Triton kernels, which
share the references' signatures. `fused_elementwise=False` keeps Triton attention but runs RMSNorm,
q/k-norm + RoPE and SwiGLU's activation as torch ops (several kernels each): benchmarks use it to
measure what the fusion buys.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelSet:
    name: str
    store_kv: object
    attention: object
    store_q_window: object
    rms_norm: object
    qk_norm_rope: object
    silu_and_mul: object
    compression_scores: object
    select_keep: object
    compact: object
    compact_batched: object
    top_p_threshold: object
    sample_top_p: object
    copy_runs: object


def get_kernel_set(backend: str, fused_elementwise: bool = True) -> KernelSet:
    from zipserve.kernels import compress as c
    from zipserve.kernels.activation import silu_and_mul_ref, silu_and_mul_triton
    from zipserve.kernels.host_copy import copy_runs_ref, copy_runs_triton
    from zipserve.kernels.kv_store import store_kv_ref, store_kv_triton
    from zipserve.kernels.paged_attention import paged_attention_ref, paged_attention_triton
    from zipserve.kernels.rms_norm import rms_norm_ref, rms_norm_triton
    from zipserve.kernels.rope import qk_norm_rope_ref, qk_norm_rope_triton
    from zipserve.kernels.sampling import sample_top_p_ref, sample_top_p_triton, top_p_threshold_ref, top_p_threshold_triton
    from zipserve.kernels.window_store import store_q_window_ref, store_q_window_triton

    if backend == "torch":
        return KernelSet("torch", store_kv_ref, paged_attention_ref, store_q_window_ref, rms_norm_ref,
                         qk_norm_rope_ref, silu_and_mul_ref, c.compression_scores_ref, c.select_keep_ref,
                         c.compact_ref, c.compact_batched_ref, top_p_threshold_ref, sample_top_p_ref, copy_runs_ref)
    if backend == "triton":
        elementwise = ((rms_norm_triton, qk_norm_rope_triton, silu_and_mul_triton) if fused_elementwise
                       else (rms_norm_ref, qk_norm_rope_ref, silu_and_mul_ref))
        return KernelSet("triton" if fused_elementwise else "triton-unfused", store_kv_triton, paged_attention_triton,
                         store_q_window_triton, *elementwise, c.compression_scores_triton, c.select_keep_triton,
                         c.compact_triton, c.compact_batched_triton, top_p_threshold_triton,
                         sample_top_p_triton, copy_runs_triton)
    raise ValueError(f"unknown backend {backend!r} (torch or triton)")
