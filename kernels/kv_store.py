"""Write this step's keys and values into their page slots."""

import torch
import triton
import triton.language as tl


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """k, v: [T, H_kv, D]; caches: [num_blocks, block_size, H_kv, D]; slot_mapping: [T] flat slots
    (page * block_size + offset), -1 = skip."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, s_kt, s_kh, s_vt, s_vh,
                     s_kcb, s_kct, s_kch, s_vcb, s_vct, s_vch, H: tl.constexpr, D: tl.constexpr,
                     BS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per token: copy its [H_kv, D] key and value rows into their page slot."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    page, off = slot // BS, slot % BS
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < H) & (d < D)
    k = tl.load(k_ptr + t.to(tl.int64) * s_kt + h * s_kh + d, mask=mask)
    v = tl.load(v_ptr + t.to(tl.int64) * s_vt + h * s_vh + d, mask=mask)
    k_dst = k_cache_ptr + page * s_kcb + off * s_kct + h * s_kch + d
    v_dst = v_cache_ptr + page * s_vcb + off * s_vct + h * s_vch + d
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Same contract as store_kv_ref, without the host sync on the -1 slots."""
    T, h, d = k.shape
    if T == 0:
        return
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "caches are written in place"
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    _store_kv_kernel[(T,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0),
                           v.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], H=h, D=d,
                           BS=k_cache.shape[1], BLOCK_H=triton.next_power_of_2(h),
                           BLOCK_D=triton.next_power_of_2(d), num_warps=4)
