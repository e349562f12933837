"""Decode steps captured as CUDA graphs, one per batch size, replayed with static input buffers.

A decode step launches a few hundred small kernels; replaying a captured graph removes the launch
gaps. Batches are padded up to the next captured size: padded rows write no K/V (slot -1), attend to
one entry of page 0 and store their query into a spare window slot, and their outputs are dropped.
Kernel grids must depend only on host constants, so attention gets `max_kv_len = max_model_len`.
"""

from __future__ import annotations

import logging

import torch

from workers.layers.attention import AttentionMetadata

log = logging.getLogger(__name__)


class DecodeGraphs:
    def __init__(self, model, kv_cache: torch.Tensor, q_window: torch.Tensor | None, batch_sizes: list[int],
                 max_model_len: int, block_size: int):
        dev = kv_cache.device
        self.model, self.kv_cache, self.q_window = model, kv_cache, q_window
        self.batch_sizes = sorted(batch_sizes)
        self.max_model_len = max_model_len
        b, width = self.batch_sizes[-1], -(-max_model_len // block_size)
        self.ids = torch.zeros(b, dtype=torch.long, device=dev)
        self.pos = torch.zeros(b, dtype=torch.long, device=dev)
        self.slots = torch.full((b,), -1, dtype=torch.long, device=dev)
        self.tables = torch.zeros(b, width, dtype=torch.int32, device=dev)
        self.qsl = torch.arange(b + 1, dtype=torch.int32, device=dev)
        self.kv_lens = torch.ones(b, dtype=torch.int32, device=dev)
        self.win_rows = torch.arange(b, dtype=torch.long, device=dev)
        self.spare_slot = None if q_window is None else q_window.shape[1] - 1
        self.win_slots = torch.full((b,), self.spare_slot or 0, dtype=torch.long, device=dev)
        self.win_pos = torch.zeros(b, dtype=torch.long, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture()

    def _meta(self, b: int) -> AttentionMetadata:
        windows = self.q_window is not None
        return AttentionMetadata(
            slot_mapping=self.slots[:b], block_tables=self.tables[:b], query_start_loc=self.qsl[: b + 1],
            kv_lens=self.kv_lens[:b], max_query_len=1, max_kv_len=self.max_model_len,
            window_rows=self.win_rows[:b] if windows else None, window_slots=self.win_slots[:b] if windows else None,
            window_pos=self.win_pos[:b] if windows else None)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for b in reversed(self.batch_sizes):  # largest first, so the smaller ones fit in its memory pool
            args = (self.ids[:b], self.pos[:b], self.kv_cache, self._meta(b), self.q_window)
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

    def run(self, ids, pos, slots, tables, kv_lens, win_slots, win_pos) -> torch.Tensor:
        """Replay the graph of the smallest captured size >= len(ids); returns hidden states [len(ids), H]."""
        n = ids.shape[0]
        b = next(s for s in self.batch_sizes if s >= n)
        self.ids[:n].copy_(ids)
        self.pos[:n].copy_(pos)
        self.slots[:b].fill_(-1)
        self.slots[:n].copy_(slots)
        self.tables[:n, : tables.shape[1]].copy_(tables)
        self.kv_lens[:b].fill_(1)
        self.kv_lens[:n].copy_(kv_lens)
        if self.q_window is not None:
            self.win_slots[:b].fill_(self.spare_slot)
            self.win_slots[:n].copy_(win_slots)
            self.win_pos[:n].copy_(win_pos)
        self.graphs[b].replay()
        return self.outputs[b][:n]
