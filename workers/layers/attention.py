"""Paged attention layer: project, RoPE, store K/V into pages, attend over each request's pages.

The batch's attention metadata is passed in explicitly (no process-global context), so the data flow
from the model runner to every layer is visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from zipserve.workers.layers.backend import KernelSet
from zipserve.workers.layers.rotary import RotaryEmbedding


class LayerCache(NamedTuple):
    k: torch.Tensor  # [num_blocks, block_size, H_kv, D]
    v: torch.Tensor
    q_window: torch.Tensor | None  # [window slots, Q, H_q, D]: recent post-RoPE queries per request


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    query_start_loc: torch.Tensor  # [B+1] int32
    kv_lens: torch.Tensor  # [B] cache length per request after this step's writes
    max_query_len: int  # host-side bounds (grid sizes without a device sync)
    max_kv_len: int
    # Query-window writes: q rows -> (request's window slot, ring index = cache index % Q)
    window_rows: torch.Tensor | None = None
    window_slots: torch.Tensor | None = None
    window_pos: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, *, qkv_bias: bool,
                 o_bias: bool, qk_norm: bool, rms_eps: float, rotary: RotaryEmbedding, kernels: KernelSet,
                 reduce=None):
        super().__init__()
        self._reduce = reduce  # tensor parallel: this rank's heads; o_proj's partial sums add up over ranks
        self.kernels = kernels
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_size, self.kv_size = n_heads * head_dim, n_kv_heads * head_dim
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=o_bias)
        # q/k norm weights (Qwen3); the norm itself runs fused with RoPE.
        self.q_norm = _NormWeight(head_dim) if qk_norm else None
        self.k_norm = _NormWeight(head_dim) if qk_norm else None
        self.rms_eps = rms_eps
        self.rotary = rotary
        self.scale = head_dim**-0.5

    def forward(self, positions, x, cache: LayerCache, meta: AttentionMetadata):
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.n_heads, self.head_dim)
        k = k.view(-1, self.n_kv_heads, self.head_dim)
        v = v.view(-1, self.n_kv_heads, self.head_dim)
        kern = self.kernels
        norm = self.q_norm is not None
        q, k = kern.qk_norm_rope(q, k, positions, self.rotary.cos, self.rotary.sin,
                                 self.q_norm.weight if norm else None, self.k_norm.weight if norm else None,
                                 self.rms_eps)
        kern.store_kv(k, v, cache.k, cache.v, meta.slot_mapping)
        if cache.q_window is not None and meta.window_rows is not None:
            kern.store_q_window(q, cache.q_window, meta.window_rows, meta.window_slots, meta.window_pos)
        o = kern.attention(q, cache.k, cache.v, meta.block_tables, meta.query_start_loc, meta.kv_lens, self.scale,
                           max_query_len=meta.max_query_len, max_kv_len=meta.max_kv_len)
        out = self.o_proj(o.reshape(-1, self.q_size))
        return out if self._reduce is None else self._reduce(out)


class _NormWeight(nn.Module):
    """Holds a norm's weight under the checkpoint's name (`q_norm.weight`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
