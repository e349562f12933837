"""The compression stage: score a request's cache and pack the kept entries into its private pages.

It executes `CompactionPlan`s made by the scheduler and block manager (which pages to read, which to
write, from which state); it changes device tensors only. The pages a plan releases go back to the pool
only after `run` has returned (on GPU: after its event).
"""

from __future__ import annotations

import time

import torch

from zipserve.kernels.compress import (compact_ref, compact_triton, compression_scores_ref, compression_scores_triton,
                              select_keep_ref, select_keep_triton)
from zipserve.workers.block_manager import CompactionPlan
from zipserve.workers.config import CompressionConfig

# backend -> (scores, select, compact): the plain-torch references or their Triton versions.
BACKENDS = {
    "torch": (compression_scores_ref, select_keep_ref, compact_ref),
    "triton": (compression_scores_triton, select_keep_triton, compact_triton),
}


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    """An index tensor on `device`. On CUDA it goes through pinned memory without blocking the host: a
    pageable copy would wait for the decode queued before it, and the compression would not overlap."""
    t = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class Compressor:
    def __init__(self, cfg: CompressionConfig, kv_cache: torch.Tensor, q_window: torch.Tensor,
                 score_cache: torch.Tensor | None, block_size: int, scale: float, backend: str = "torch"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        self.scores_fn, self.select_fn, self.compact_fn = BACKENDS[backend]
        self.cfg = cfg
        self.kv_cache = kv_cache  # [2, L, NB, bs, H_kv, D]
        self.q_window = q_window  # [L, slots, Q, H_q, D]
        self.score_cache = score_cache  # [L, NB, bs, H_kv] fp32, or None without global scores
        self.block_size = block_size
        self.scale = scale
        self.num_compressions = 0
        self.total_seconds = 0.0  # host time to launch (CPU: to run) the compression stage
        self.kept_log: list | None = None  # set to a list to record (request id, kept indices) per layer group

    @torch.inference_mode()
    def run(self, plans: list[CompactionPlan]) -> None:
        for plan in plans:
            t0 = time.perf_counter()
            self._compact(plan)
            self.total_seconds += time.perf_counter() - t0
            self.num_compressions += 1

    @torch.inference_mode()
    def warm_up(self, budget_blocks: int, window_slot: int, num_prompt_tokens: int) -> None:
        """Compile the compression kernels before the first request (a compile at a request's first page
        boundary stalls every running request): a first compression and a later one (with global scores),
        of budget + 1 pages into budget pages. The kernels do not specialize on lengths, so these serve all.
        Writes only free pages (page i for i <= budget) and the spare window slot; counts nothing."""
        from types import SimpleNamespace

        bs, keep = self.block_size, budget_blocks * self.block_size
        seq = SimpleNamespace(request_id=None, window_slot=window_slot, num_prompt_tokens=num_prompt_tokens)
        src = list(range(budget_blocks + 1))
        for first in (True, False):
            self._compact(CompactionPlan(seq, src, src[:budget_blocks] + [src[-1]], [], keep + bs, keep, 0,
                                         0 if first else keep, first))

    def kept_indices(self, plan: CompactionPlan, layers: slice) -> torch.Tensor:
        """Indices (cache order) of the entries kept per (layer, KV head): [layers, H_kv, keep]."""
        return self._score_and_select(plan, layers)[0]

    def _score_and_select(self, plan: CompactionPlan, layers: slice, cfg: CompressionConfig | None = None):
        seq, bs, Q = plan.seq, self.block_size, self.cfg.query_window
        n = plan.kv_len
        src = _index(plan.src_table[: -(-n // bs)], self.kv_cache.device)
        h_kv, d = self.kv_cache.shape[-2:]
        lg = layers.stop - layers.start
        k = self.kv_cache[0, layers, src].reshape(lg, -1, h_kv, d)[:, :n]
        ring = _index([(n - Q + i) % Q for i in range(Q)], src.device)
        q_win = self.q_window[layers, seq.window_slot][:, ring]
        g_prev = None
        if self.score_cache is not None and plan.num_scored:
            g_prev = self.score_cache[layers, src].reshape(lg, -1, h_kv)[:, : plan.num_scored].transpose(1, 2)
        cfg = cfg or self.cfg.for_compression(plan.keep, seq.num_prompt_tokens)
        scores, g = self.scores_fn(q_win, k, g_prev, plan.num_scored, plan.first, self.scale, cfg, bs)
        return self.select_fn(scores, plan.keep), g, src

    def _compact(self, plan: CompactionPlan) -> None:
        bs = self.block_size
        num_layers, h_kv = self.kv_cache.shape[1], self.kv_cache.shape[-2]
        n, keep = plan.kv_len, plan.keep
        dest = _index(plan.dest_table[: keep // bs], self.kv_cache.device)
        cfg = self.cfg.for_compression(keep, plan.seq.num_prompt_tokens)  # once per plan, not per layer group
        for l0 in range(0, num_layers, self.cfg.layer_group):
            layers = slice(l0, min(num_layers, l0 + self.cfg.layer_group))
            lg = layers.stop - layers.start
            idx, g, src = self._score_and_select(plan, layers, cfg)
            if self.kept_log is not None:
                self.kept_log.append((plan.seq.request_id, plan.num_scored, layers.start, idx.cpu()))
            for kv in (0, 1):
                self.compact_fn(self.kv_cache[kv, layers], src, n, idx, dest)  # dest may reuse src pages
            if self.score_cache is not None:  # the new G (not the old cached scores) moves with the kept entries
                self.score_cache[layers, dest] = g.gather(2, idx).transpose(1, 2).reshape(lg, keep // bs, bs, h_kv)

    def stats(self) -> dict:
        return {
            "compressions": self.num_compressions,
            "compression_seconds": self.total_seconds,
            "mean_compression_ms": 1000 * self.total_seconds / self.num_compressions if self.num_compressions else 0.0,
        }
