"""The compression stage: score a request's cache and pack the kept entries into its private pages.

It executes `CompactionPlan`s made by the scheduler and block manager (which pages to read, which to
write, from which state); it changes device tensors only. The pages a plan releases go back to the pool
only after `run` has returned (on GPU: after its event).

The plans of one call that the kernels treat alike (same lengths, same resolved knobs) run as one batch:
per layer group one gather, one set of scoring launches, one selection and one compaction for all of
them, instead of one set per request (launch-bound, and a lone request fills few of the GPU's cores).
"""

from __future__ import annotations

import time

import torch

from zipserve.kernels.compress import (compact_batched_ref, compact_batched_triton, compact_ref, compact_triton,
                                       compression_scores_ref, compression_scores_triton, select_keep_ref,
                                       select_keep_triton)
from zipserve.workers.block_manager import CompactionPlan
from zipserve.workers.config import CompressionConfig

# backend -> (scores, select, compact, batched compact): the plain-torch references or their Triton versions.
BACKENDS = {
    "torch": (compression_scores_ref, select_keep_ref, compact_ref, compact_batched_ref),
    "triton": (compression_scores_triton, select_keep_triton, compact_triton, compact_batched_triton),
}


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    """An index tensor on `device`. On CUDA it goes through pinned memory without blocking the host: a
    pageable copy would wait for the decode queued before it, and the compression would not overlap."""
    t = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _upload(arrays: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Several index arrays in one host-to-device copy. Each starts on a 16-element boundary: Triton
    specializes on a pointer's alignment, and a batch's sizes must not pick the kernel variant."""
    starts, flat = [], []
    for a in arrays:
        flat += [0] * (-len(flat) % 16)
        starts.append(len(flat))
        flat += a
    t = _index(flat, device)
    return [t[s: s + len(a)] for s, a in zip(starts, arrays)]


class Compressor:
    def __init__(self, cfg: CompressionConfig, kv_cache: torch.Tensor, q_window: torch.Tensor,
                 score_cache: torch.Tensor | None, block_size: int, scale: float, backend: str = "torch",
                 max_batch_tokens: int | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        self.scores_fn, self.select_fn, self.compact_fn, self.compact_batch_fn = BACKENDS[backend]
        self.cfg = cfg
        self.kv_cache = kv_cache  # [2, L, NB, bs, H_kv, D]
        self.q_window = q_window  # [L, slots, Q, H_q, D]
        self.score_cache = score_cache  # [L, NB, bs, H_kv] fp32, or None without global scores
        self.block_size = block_size
        self.scale = scale
        self.num_compressions = 0
        self.total_seconds = 0.0  # host time to launch (CPU: to run) the compression stage
        self.kept_log: list | None = None  # set to a list to record (request id, kept indices) per layer group
        # Batched compression: scratch grows with the entries scored at once, so a batch holds at most
        # max_batch_tokens (whole pages; None: no cap); batched=False runs plan by plan (the oracle of tests).
        self.max_batch_tokens = max_batch_tokens
        self.batched = True
        num_layers, h_kv, d = kv_cache.shape[1], kv_cache.shape[-2], kv_cache.shape[-1]
        # A layer group's gathered K stays under 2**31 elements: the scoring kernels use int32 offsets.
        self._max_gather_tokens = (2**31 - 1) // (min(cfg.layer_group, num_layers) * h_kv * d)
        self._layer_groups = [(slice(l0, min(num_layers, l0 + cfg.layer_group)),
                               torch.arange(l0, min(num_layers, l0 + cfg.layer_group), device=kv_cache.device))
                              for l0 in range(0, num_layers, cfg.layer_group)]

    @torch.inference_mode()
    def run(self, plans: list[CompactionPlan]) -> None:
        t0 = time.perf_counter()
        self._run(plans)
        self.total_seconds += time.perf_counter() - t0
        self.num_compressions += len(plans)

    def _run(self, plans: list[CompactionPlan]) -> None:
        if not self.batched:
            for plan in plans:
                self._compact(plan)
            return
        logs = [[] for _ in plans] if self.kept_log is not None else None
        for wave in self._waves(plans):
            groups: dict[tuple, tuple] = {}
            for i in wave:
                plan = plans[i]
                cfg = self.cfg.for_compression(plan.keep, plan.seq.num_prompt_tokens)
                # What the kernels' shapes and branches depend on (window slots and page tables are per row;
                # the config is frozen and compares by value).
                key = (plan.kv_len, plan.keep, plan.num_scored, plan.first, cfg)
                groups.setdefault(key, (cfg, []))[1].append(i)
            for cfg, members in groups.values():
                for batch in self._batches(members, plans[members[0]].kv_len):
                    self._compact_batch([plans[i] for i in batch], cfg, logs and [logs[i] for i in batch])
        for records in logs or ():  # in the order a plan-by-plan run appends them
            self.kept_log.extend(records)

    def _waves(self, plans: list[CompactionPlan]) -> list[list[int]]:
        """Consecutive runs of plans in which none writes a page that another one reads or writes, so the
        run's batches may go in any order. The block manager gives a plan private or fresh pages to write
        (prefix pages are only read), so this is one wave unless a request has two plans in one call."""
        bs, waves, reads, writes = self.block_size, [[]], set(), set()
        for i, p in enumerate(plans):
            r, w = set(p.src_table[: -(-p.kv_len // bs)]), set(p.dest_table[: p.keep // bs])
            if waves[-1] and (w & (reads | writes) or r & writes):
                waves.append([])
                reads, writes = set(), set()
            waves[-1].append(i)
            reads |= r
            writes |= w
        return waves

    def _batches(self, members: list[int], kv_len: int) -> list[list[int]]:
        """Split a group so that each batch gathers at most max_batch_tokens entries (at least one plan)."""
        cap = min(self.max_batch_tokens or self._max_gather_tokens, self._max_gather_tokens)
        per = max(1, cap // (-(-kv_len // self.block_size) * self.block_size))
        return [members[i: i + per] for i in range(0, len(members), per)]

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
            self._run([CompactionPlan(seq, src, src[:budget_blocks] + [src[-1]], [], keep + bs, keep, 0,
                                      0 if first else keep, first)])

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

    def _compact_batch(self, plans: list[CompactionPlan], cfg: CompressionConfig, logs: list[list] | None) -> None:
        """_compact for plans of one group key: their layer groups stacked, B * lg rows per launch."""
        bs, (h_kv, d), Q = self.block_size, self.kv_cache.shape[-2:], self.cfg.query_window
        p0, B = plans[0], len(plans)
        n, keep, num_scored = p0.kv_len, p0.keep, p0.num_scored
        pages, kp, sp = -(-n // bs), keep // bs, -(-num_scored // bs)
        src, dest, slots, ring = _upload([[b for p in plans for b in p.src_table[:pages]],
                                          [b for p in plans for b in p.dest_table[:kp]],
                                          [p.seq.window_slot for p in plans],
                                          [(n - Q + i) % Q for i in range(Q)]], self.kv_cache.device)
        src, dest = src.view(B, pages), dest.view(B, kp)
        use_scores = self.score_cache is not None and num_scored > 0
        for layers, lay in self._layer_groups:
            lg = layers.stop - layers.start
            rows, cols = lay[None, :, None], src[:, None, :]  # [B, lg, pages] page coordinates
            k = self.kv_cache[0][rows, cols].reshape(B * lg, pages * bs, h_kv, d)[:, :n]
            q_win = self.q_window[rows, slots[:, None, None], ring].flatten(0, 1)  # [B * lg, Q, H_q, D]
            g_prev = None
            if use_scores:
                g_prev = self.score_cache[rows, cols[..., :sp]].reshape(B * lg, sp * bs, h_kv)[:, :num_scored]
                g_prev = g_prev.transpose(1, 2)
            scores, g = self.scores_fn(q_win, k, g_prev, num_scored, p0.first, self.scale, cfg, bs)
            idx = self.select_fn(scores, keep)  # [B * lg, H_kv, keep]
            if logs is not None:
                kept = idx.view(B, lg, h_kv, keep).cpu()
                for b, p in enumerate(plans):
                    logs[b].append((p.seq.request_id, num_scored, layers.start, kept[b]))
            for kv in (0, 1):  # dest may reuse src pages: each launch reads every request before writing
                self.compact_batch_fn(self.kv_cache[kv, layers], src, n, idx.view(B, lg, h_kv, keep), dest)
            if self.score_cache is not None:  # the new G (not the old cached scores) moves with the kept entries
                g_kept = g.gather(2, idx).view(B, lg, h_kv, kp, bs).permute(0, 1, 3, 4, 2)
                self.score_cache[rows, dest[:, None, :]] = g_kept

    def stats(self) -> dict:
        return {
            "compressions": self.num_compressions,
            "compression_seconds": self.total_seconds,
            "mean_compression_ms": 1000 * self.total_seconds / self.num_compressions if self.num_compressions else 0.0,
        }
