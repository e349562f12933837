"""Decode steps captured as CUDA graphs, one per batch size, replayed with static input buffers.

A decode step launches a few hundred small kernels; replaying a captured graph removes the launch
gaps. Batches are padded up to the next captured size: padded rows write no K/V (slot -1), attend to
one entry of page 0 and store their query into a spare window slot, and their outputs are dropped.
Kernel grids must depend only on host constants, so attention gets `max_kv_len = max_model_len`.
"""

from __future__ import annotations

import logging

import torch

from zipserve.workers.layers.attention import AttentionMetadata

log = logging.getLogger(__name__)


class DecodeGraphs:
    """Static inputs live in two flat buffers (int64: ids, positions, slots, window slots and ring
    positions; int32: kv lens, page tables). The graph of batch size b reads views laid out for b, so one
    step's inputs, padded to b on the host, cross to the device in two copies."""

    def __init__(self, model, kv_cache: torch.Tensor, q_window: torch.Tensor | None, batch_sizes: list[int],
                 max_model_len: int, block_size: int):
        dev = kv_cache.device
        self.device = dev
        self.model, self.kv_cache, self.q_window = model, kv_cache, q_window
        self.batch_sizes = sorted(batch_sizes)
        self.max_model_len = max_model_len
        b, self.width = self.batch_sizes[-1], -(-max_model_len // block_size)
        self.flat64 = torch.zeros(5 * b, dtype=torch.long, device=dev)
        self.flat32 = torch.zeros(b * (1 + self.width), dtype=torch.int32, device=dev)
        self.qsl = torch.arange(b + 1, dtype=torch.int32, device=dev)
        self.win_rows = torch.arange(b, dtype=torch.long, device=dev)
        self.spare_slot = None if q_window is None else q_window.shape[1] - 1
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture()

    def _inputs(self, b: int):
        """(ids, positions, meta) as views of the flat buffers laid out for batch size b."""
        f64, f32, w = self.flat64, self.flat32, self.width
        ids, pos, slots, win_slots, win_pos = (f64[i * b : (i + 1) * b] for i in range(5))
        kv_lens, tables = f32[:b], f32[b : b + b * w].view(b, w)
        windows = self.q_window is not None
        meta = AttentionMetadata(
            slot_mapping=slots, block_tables=tables, query_start_loc=self.qsl[: b + 1], kv_lens=kv_lens,
            max_query_len=1, max_kv_len=self.max_model_len,
            window_rows=self.win_rows[:b] if windows else None, window_slots=win_slots if windows else None,
            window_pos=win_pos if windows else None)
        return ids, pos, meta

    def _fill_padding(self, b: int) -> None:
        """Rows of a padded batch write no K/V (slot -1), attend to one entry and use the spare window."""
        f64, f32 = self.flat64, self.flat32
        f64[:5 * b].zero_()
        f64[2 * b : 3 * b].fill_(-1)
        f64[3 * b : 4 * b].fill_(self.spare_slot or 0)
        f32[:b].fill_(1)
        f32[b:].zero_()

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for b in reversed(self.batch_sizes):  # largest first, so the smaller ones fit in its memory pool
            self._fill_padding(b)
            ids, pos, meta = self._inputs(b)
            args = (ids, pos, self.kv_cache, meta, self.q_window)
            self.model(*args)  # compile kernels and settle the allocator outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self.model(*args)
            pool = graph.pool()
            self.graphs[b] = graph
        log.info("captured decode CUDA graphs for batch sizes %s", self.batch_sizes)

    def fits(self, batch: int) -> bool:
        return batch <= self.batch_sizes[-1]

    def run(self, ids, pos, slots, tables, kv_lens, win_slots, win_pos, fill=None) -> torch.Tensor:
        """Replay the graph of the smallest captured size >= len(ids) (host int lists in; padded here);
        returns hidden states [len(ids), H]. fill(ids buffer): writes ids known only on the device."""
        n = len(ids)
        b = next(s for s in self.batch_sizes if s >= n)
        pad, w = b - n, self.width
        host64 = torch.tensor(ids + [0] * pad + pos + [0] * pad + slots + [-1] * pad
                              + win_slots + [self.spare_slot or 0] * pad + win_pos + [0] * pad, dtype=torch.long)
        flat_tables = [p for t in tables for p in t + [0] * (w - len(t))]
        host32 = torch.tensor(kv_lens + [1] * pad + flat_tables + [0] * (pad * w), dtype=torch.int32)
        self.flat64[: 5 * b].copy_(host64.pin_memory(), non_blocking=True)
        self.flat32[: b * (1 + w)].copy_(host32.pin_memory(), non_blocking=True)
        if fill is not None:
            fill(self.flat64[:b])
        self.graphs[b].replay()
        return self.outputs[b][:n]
