"""The compression stage: score a request's cache and pack the kept entries into its private pages.

It executes `CompactionPlan`s made by the scheduler and block manager (which pages to read, which to
write, from which state); it changes device tensors only. The pages a plan releases go back to the pool
only after `run` has returned (on GPU: after its event).

The plans of one call that the kernels treat alike (same lengths, same resolved knobs) run as one batch:
per layer group one gather, one set of scoring launches, one selection and one compaction for all of
them, instead of one set per request (launch-bound, and a lone request fills few of the GPU's cores).
On CUDA the steady-state batches (a later compression of budget + 1 full pages, at a few batch sizes) are
also captured as CUDA graphs (`capture_graphs`): a batch then costs one copy of its page tables and one
replay instead of a hundred launches, which is most of a compression's cost.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial

import torch

from zipserve.workers.block_manager import CompactionPlan
from zipserve.workers.config import CompressionConfig
from zipserve.workers.layers.backend import get_kernel_set
from zipserve.workers.transfer import to_device

log = logging.getLogger(__name__)


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    """An index tensor on `device`, without blocking the host (workers/transfer.py)."""
    return to_device(values, torch.long, device)


def _layout(arrays: list[list[int]]) -> tuple[list[int], list[slice]]:
    """Several index arrays as one flat list, and where each lies. Each starts on a 16-element boundary:
    Triton specializes on a pointer's alignment, and a batch's sizes must not pick the kernel variant."""
    spans, flat = [], []
    for a in arrays:
        flat += [0] * (-len(flat) % 16)
        spans.append(slice(len(flat), len(flat) + len(a)))
        flat += a
    return flat, spans


def _upload(arrays: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Several index arrays in one host-to-device copy (see _layout)."""
    flat, spans = _layout(arrays)
    t = _index(flat, device)
    return [t[s] for s in spans]


def ring_order(kv_len: int, window: int) -> list[int]:
    """Slots of the query-window ring buffer, oldest query first, after kv_len entries were written."""
    return [(kv_len - window + i) % window for i in range(window)]


def take(pool: torch.Tensor, *index) -> torch.Tensor:
    """pool[index] (advanced indexing over leading dims), copied through an integer view of the last dim as
    wide as it allows: torch's indexing kernel moves one element per thread, so 16-bit K pages move
    four times fewer elements as int64. Same values as pool[index]."""
    nbytes = pool.shape[-1] * pool.element_size()
    wide = next((t for t in (torch.int64, torch.int32) if nbytes % t.itemsize == 0 and pool.element_size() < t.itemsize
                 and pool.stride(-1) == 1 and pool.storage_offset() * pool.element_size() % t.itemsize == 0), None)
    if wide is None:
        return pool[index]
    return pool.view(wide)[index].view(pool.dtype)


def layers_at_once(entries: int, layer_group: int, max_batch_tokens: int | None) -> int:
    """Layers a compression batch of `entries` cache entries scores at once: layer_group while the batch
    fits max_batch_tokens, fewer for a longer one (a long prompt compressed at the end of its prefill), so
    that scratch stays that of layer_group x max_batch_tokens entries (or of one layer, if more)."""
    if max_batch_tokens is None or entries <= max_batch_tokens:
        return layer_group
    return max(1, layer_group * max_batch_tokens // entries)


def graph_chunks(count: int, sizes) -> list[int]:
    """Split a batch of `count` plans into captured sizes, largest first (greedy); what remains below the
    smallest size is one last chunk, run eagerly. Batched equals plan by plan, so any split gives the same caches."""
    out = []
    for b in sorted(sizes, reverse=True):
        while count >= b:
            out.append(b)
            count -= b
    return out + [count] * (count > 0)


@dataclass
class _Graph:
    """A captured batch: its graph reads the index arrays (`_index_arrays`' layout) from `flat`."""
    flat: torch.Tensor
    graph: torch.cuda.CUDAGraph


class Compressor:
    def __init__(self, cfg: CompressionConfig, kv_cache: torch.Tensor, q_window: torch.Tensor,
                 score_cache: torch.Tensor | None, block_size: int, scale: float, backend: str = "torch",
                 max_batch_tokens: int | None = None):
        self.use_kernels(get_kernel_set(backend))
        self.cfg = cfg
        self.kv_cache = kv_cache  # [2, L, NB, bs, H_kv, D]
        self.q_window = q_window  # [L, slots, Q, H_q, D]
        self.score_cache = score_cache  # [L, NB, bs, H_kv] fp32, or None without global scores
        self.block_size = block_size
        self.scale = scale
        self.num_compressions = 0
        self.graph_compressions = 0  # of which replayed from a captured graph
        self.graphs: dict[tuple, _Graph] = {}  # (B, kv_len, keep, num_scored, first, cfg) -> graph
        self._graph_sizes: tuple[int, ...] = ()
        self._graph_end = None  # an event after the last replay (CUDA)
        self.total_seconds = 0.0  # host time to launch (CPU: to run) the compression stage
        self.kept_log: list | None = None  # set to a list to record (request id, kept indices) per layer group
        # Batched compression: scratch grows with the entries scored at once, so a batch holds at most
        # max_batch_tokens (whole pages; None: no cap); batched=False runs plan by plan (the oracle of tests).
        self.max_batch_tokens = max_batch_tokens
        self.batched = True
        num_layers, h_kv, d = kv_cache.shape[1], kv_cache.shape[-2], kv_cache.shape[-1]
        # A layer group's gathered K stays under 2**31 elements: the scoring kernels use int32 offsets.
        self._max_gather_tokens = (2**31 - 1) // (min(cfg.layer_group, num_layers) * h_kv * d)
        self._group_sizes: dict[int, list[tuple[slice, torch.Tensor]]] = {}
        self.store = None  # a HostKVStore under recall (use_recall)
        self.pos_cache = None  # [L, NB, bs, H_kv] int32: the positions of kept entries, under recall

    def use_recall(self, store, pos_cache: torch.Tensor) -> None:
        """Keep what compressions evict in `store` and recall it (workers/host_store.py); pos_cache holds
        the positions of the entries compactions keep (recalled ones rejoin in position order)."""
        self.store, self.pos_cache = store, pos_cache

    def _layer_groups_of(self, size: int) -> list[tuple[slice, torch.Tensor]]:
        """The layers cut into groups of `size`: (slice, index tensor) each (made once per size)."""
        if size not in self._group_sizes:
            num_layers, dev = self.kv_cache.shape[1], self.kv_cache.device
            self._group_sizes[size] = [(slice(l0, min(num_layers, l0 + size)),
                                        torch.arange(l0, min(num_layers, l0 + size), device=dev))
                                       for l0 in range(0, num_layers, size)]
        return self._group_sizes[size]

    def layer_group_for(self, entries: int) -> int:
        """Layers scored at once for a batch of `entries` cache entries (see layers_at_once)."""
        return layers_at_once(entries, min(self.cfg.layer_group, self.kv_cache.shape[1]), self.max_batch_tokens)

    def use_kernels(self, kernels) -> None:
        """Score, select and compact with this kernel set's (workers/layers/backend.py) compression kernels."""
        self.scores_fn, self.select_fn = kernels.compression_scores, kernels.select_keep
        self.compact_fn, self.compact_batch_fn = kernels.compact, kernels.compact_batched

    @torch.inference_mode()
    def run(self, plans: list[CompactionPlan]) -> None:
        t0 = time.perf_counter()
        self._run(plans)
        self.total_seconds += time.perf_counter() - t0
        self.num_compressions += len(plans)

    def _run(self, plans: list[CompactionPlan]) -> None:
        if self.store is not None:  # (a request that asked for no recall keeps nothing in the store)
            for plan in plans:
                (self._compact if plan.seq.params.recall_pages == 0 else self._compact_recall)(plan)
            return
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
        per = self._per_batch(kv_len)
        return [members[i: i + per] for i in range(0, len(members), per)]

    def _per_batch(self, kv_len: int) -> int:
        cap = min(self.max_batch_tokens or self._max_gather_tokens, self._max_gather_tokens)
        return max(1, cap // (-(-kv_len // self.block_size) * self.block_size))

    @torch.inference_mode()
    def warm_up(self, budget_blocks: int, window_slot: int, num_prompt_tokens: int) -> None:
        """Compile the compression kernels before the first request (a compile at a request's first page
        boundary stalls every running request): a first compression and a later one (with global scores),
        of budget + 1 pages into budget pages. The kernels do not specialize on lengths, so these serve all.
        Writes only free pages (page i for i <= budget) and the spare window slot; counts nothing."""
        for first in (True, False):
            self._run([self._free_page_plan(budget_blocks, window_slot, num_prompt_tokens, first)])
        if self.store is not None:
            self.store.release(None)  # (the warm-up plans' evictions)

    def _free_page_plan(self, budget_blocks: int, window_slot: int, num_prompt_tokens: int, first: bool):
        """A plan of budget + 1 pages into budget pages that reads and writes pages 0 .. budget only."""
        from types import SimpleNamespace

        bs, keep = self.block_size, budget_blocks * self.block_size
        seq = SimpleNamespace(request_id=None, window_slot=window_slot, num_prompt_tokens=num_prompt_tokens,
                              params=SimpleNamespace(recall_pages=None))  # recall: the engine's pages
        src = list(range(budget_blocks + 1))
        return CompactionPlan(seq, src, src[:budget_blocks] + [src[-1]], [], keep + bs, keep, 0,
                              0 if first else keep, first)

    @torch.inference_mode()
    def capture_graphs(self, budget_blocks: int, window_slot: int, sizes=(1, 2, 4),
                       stream: torch.cuda.Stream | None = None) -> None:
        """Capture the decode-time compressions as CUDA graphs, one per batch size and kind: budget + 1 full
        pages into budget pages, a request's first (nothing scored yet) and every later one (global scores
        carried: num_scored = keep, as the block manager sets it), which every decoding request makes each
        page once it is full. Call after warm_up (compiled kernels). Nothing is captured when the resolved config depends on the prompt
        (prompt_fraction): the key would differ per request.

        Sizes above what one batch may hold (max_batch_tokens, see _batches) are dropped: no batch would
        use them. All graphs share one memory pool (captured largest first): they never run concurrently
        (one at a time, see _replay) and keep no output in it, so it holds the scratch of the largest size,
        apart from the eager allocator's (the runner reserves both: ModelRunner.compression_scratch_bytes).
        Warm-up and capture read and write free pages only (0 .. budget, window slot `window_slot`)."""
        if self.cfg.prompt_fraction:
            return
        t0, dev = time.perf_counter(), self.kv_cache.device
        bs, keep = self.block_size, budget_blocks * self.block_size
        n, cfg = (budget_blocks + 1) * bs, self.cfg.for_compression(keep, 0)
        sizes = sorted({b for b in sizes if 1 <= b <= self._per_batch(n)}, reverse=True)
        stream = stream or torch.cuda.Stream(dev)
        pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved(dev)
        for b, first in ((b, first) for b in sizes for first in (False, True)):
            key = (n, keep, 0 if first else keep, first, cfg)
            plan = self._free_page_plan(budget_blocks, window_slot, 0, first=first)
            flat, spans = _layout(self._index_arrays([plan] * b))
            flat = torch.tensor(flat, dtype=torch.long, device=dev)
            views = [flat[s] for s in spans]
            stream.wait_stream(torch.cuda.current_stream(dev))  # the buffer's copy
            with torch.cuda.stream(stream):  # compile this size's variants and settle the allocator
                self._compact_device(*views, *key)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self._compact_device(*views, *key)
            self.graphs[(b, *key)] = _Graph(flat, graph)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        self._graph_sizes = tuple(sizes)
        self._graph_end = torch.cuda.Event()
        log.info("captured compression CUDA graphs (first and later) for batch sizes %s (%d into %d pages) in %.1f s, "
                 "pool %.1f MiB",
                 sorted(sizes), budget_blocks + 1, budget_blocks, time.perf_counter() - t0,
                 (torch.cuda.memory_reserved(dev) - reserved) / 2**20)

    def kept_indices(self, plan: CompactionPlan, layers: slice) -> torch.Tensor:
        """Indices (cache order) of the entries kept per (layer, KV head): [layers, H_kv, keep]."""
        return self._score_and_select(plan, layers)[0]

    def _score_and_select(self, plan: CompactionPlan, layers: slice, cfg: CompressionConfig | None = None):
        seq, bs, Q = plan.seq, self.block_size, self.cfg.query_window
        n = plan.kv_len
        src = _index(plan.src_table[: -(-n // bs)], self.kv_cache.device)
        h_kv, d = self.kv_cache.shape[-2:]
        lg = layers.stop - layers.start
        k = take(self.kv_cache[0, layers], slice(None), src).reshape(lg, -1, h_kv, d)[:, :n]
        ring = _index(ring_order(n, Q), src.device)
        q_win = self.q_window[layers, seq.window_slot][:, ring]
        g_prev = None
        if self.score_cache is not None and plan.num_scored:
            g_prev = take(self.score_cache[layers], slice(None), src).reshape(lg, -1, h_kv)[:, : plan.num_scored].transpose(1, 2)
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

    def _compact_recall(self, plan: CompactionPlan) -> None:
        """_compact with recall: per layer group, each (layer, head)'s recalled pages join its scored entries
        in position order (tests/dense_reference.py), the candidates are scored and selected as usual, the
        kept ones (with their positions and scores) are written to the destination pages, and the rest go
        to the store."""
        bs, (h_kv, d) = self.block_size, self.kv_cache.shape[-2:]
        n, keep, ns, rid = plan.kv_len, plan.keep, plan.num_scored, plan.seq.request_id
        kp, dev = keep // bs, self.kv_cache.device
        src = _index(plan.src_table[: -(-n // bs)], dev)
        dest = _index(plan.dest_table[:kp], dev)
        ring = _index(ring_order(n, self.cfg.query_window), dev)
        cfg = self.cfg.for_compression(keep, plan.seq.num_prompt_tokens)
        asked = plan.seq.params.recall_pages
        r = min(self.cfg.recall.pages if asked is None else asked, self.store.closed_pages(rid))
        evicted = n + r * bs - keep
        storing = self.store.admit(rid, evicted)
        tail = torch.arange(plan.num_positions - n + ns, plan.num_positions, device=dev)  # entries since the last
        for layers, _ in self._layer_groups_of(self.layer_group_for(n + r * bs)):
            lg = layers.stop - layers.start
            k = take(self.kv_cache[0, layers], slice(None), src).reshape(lg, -1, h_kv, d)[:, :n]
            v = take(self.kv_cache[1, layers], slice(None), src).reshape(lg, -1, h_kv, d)[:, :n]
            q_win = self.q_window[layers, plan.seq.window_slot][:, ring]
            pos = take(self.pos_cache[layers], slice(None), src).reshape(lg, -1, h_kv)[:, :ns].long()
            g_prev = None
            if self.score_cache is not None and ns:
                g_prev = take(self.score_cache[layers], slice(None), src).reshape(lg, -1, h_kv)[:, :ns].transpose(1, 2)
            taken = self.store.take(rid, layers, q_win, r)
            if taken is not None:  # scored and recalled entries in position order, then the tail (newer)
                pos = torch.cat([pos, taken.pos], 1)
                order = pos.argsort(dim=1, stable=True)  # [lg, ns + R, H]
                pos = pos.gather(1, order)
                by_entry = order[..., None].expand(-1, -1, -1, d)
                k = torch.cat([torch.cat([k[:, :ns], taken.k.to(k.dtype)], 1).gather(1, by_entry), k[:, ns:]], 1)
                v = torch.cat([torch.cat([v[:, :ns], taken.v.to(v.dtype)], 1).gather(1, by_entry), v[:, ns:]], 1)
                if self.score_cache is not None:
                    g_all = taken.g if g_prev is None else torch.cat([g_prev, taken.g], 2)
                    g_prev = g_all.gather(2, order.transpose(1, 2))
            num_scored = pos.shape[1]
            pos = torch.cat([pos, tail[None, :, None].expand(lg, -1, h_kv)], 1)  # [lg, N, H]
            scores, g = self.scores_fn(q_win, k, g_prev, num_scored, plan.first, self.scale, cfg, bs)
            idx = self.select_fn(scores, keep)  # [lg, H, keep], candidate order
            if self.kept_log is not None:
                self.kept_log.append((rid, num_scored, layers.start, idx.cpu()))
            rows = idx.transpose(1, 2)  # [lg, keep, H]
            for kv, x in ((0, k), (1, v)):
                self.kv_cache[kv, layers, dest] = x.gather(1, rows[..., None].expand(-1, -1, -1, d)).view(lg, kp, bs, h_kv, d)
            self.pos_cache[layers, dest] = pos.gather(1, rows).view(lg, kp, bs, h_kv).to(torch.int32)
            if self.score_cache is not None:
                self.score_cache[layers, dest] = g.gather(2, idx).transpose(1, 2).reshape(lg, kp, bs, h_kv)
            if storing and evicted:
                gone = torch.ones(idx.shape[0], h_kv, k.shape[1], dtype=torch.bool, device=dev)
                gone.scatter_(2, idx, False)
                out = gone.to(torch.int8).argsort(dim=2, descending=True, stable=True)[..., :evicted]  # in order
                rows = out.transpose(1, 2)
                by_entry = rows[..., None].expand(-1, -1, -1, d)
                self.store.put(rid, layers, k.gather(1, by_entry), v.gather(1, by_entry), pos.gather(1, rows),
                               g.gather(2, out) if self.score_cache is not None else None)

    def _compact_batch(self, plans: list[CompactionPlan], cfg: CompressionConfig, logs: list[list] | None) -> None:
        """_compact for plans of one group key: their layer groups stacked, B * lg rows per launch. Where
        the key has captured graphs (and no kept indices are logged), chunks of captured sizes replay them."""
        p0 = plans[0]
        key = (p0.kv_len, p0.keep, p0.num_scored, p0.first, cfg)
        sizes = [b for b in self._graph_sizes if (b, *key) in self.graphs] if logs is None else []
        at = 0
        for b in graph_chunks(len(plans), sizes):
            chunk, at = plans[at: at + b], at + b
            if b in sizes:
                self._replay(self.graphs[(b, *key)], chunk)
            else:
                on_kept = None if logs is None else partial(self._log_kept, chunk, logs[at - b: at])
                self._compact_device(*_upload(self._index_arrays(chunk), self.kv_cache.device), *key, on_kept)

    @staticmethod
    def _log_kept(plans, logs, l0: int, kept: torch.Tensor) -> None:
        kept = kept.cpu()
        for b, p in enumerate(plans):
            logs[b].append((p.seq.request_id, p.num_scored, l0, kept[b]))

    def _index_arrays(self, plans: list[CompactionPlan]) -> list[list[int]]:
        """The host part of a batch: source page tables, destination page tables, window slots, ring order."""
        bs, Q, p0 = self.block_size, self.cfg.query_window, plans[0]
        n, pages, kp = p0.kv_len, -(-p0.kv_len // bs), p0.keep // bs
        return [[b for p in plans for b in p.src_table[:pages]], [b for p in plans for b in p.dest_table[:kp]],
                [p.seq.window_slot for p in plans], ring_order(n, Q)]

    def _replay(self, g: _Graph, plans: list[CompactionPlan]) -> None:
        """Copy a chunk's index arrays into the graph's buffer and replay it, on the current stream. A replay
        first waits for the last one (the runner may compress on another stream; buffers and pool are shared)."""
        cuda = self._graph_end is not None  # else a CPU test's stand-in graph
        host = torch.tensor(_layout(self._index_arrays(plans))[0], dtype=torch.long, pin_memory=cuda)
        if cuda:
            torch.cuda.current_stream(g.flat.device).wait_event(self._graph_end)
        g.flat.copy_(host, non_blocking=True)
        g.graph.replay()
        if cuda:
            self._graph_end.record()
        self.graph_compressions += len(plans)

    def _compact_device(self, src: torch.Tensor, dest: torch.Tensor, slots: torch.Tensor, ring: torch.Tensor,
                        n: int, keep: int, num_scored: int, first: bool, cfg: CompressionConfig,
                        on_kept=None) -> None:
        """The device part of a batch (the eager path and the captured graphs): B = len(slots) plans of
        kv_len n, flat page tables src [B * pages] and dest [B * keep // bs]. No host sync, no pinned memory
        (it is captured), except on_kept(layer group start, kept indices [B, lg, H_kv, keep]) for tests."""
        bs, (h_kv, d) = self.block_size, self.kv_cache.shape[-2:]
        B, pages, kp, sp = len(slots), -(-n // bs), keep // bs, -(-num_scored // bs)
        src, dest = src.view(B, pages), dest.view(B, kp)
        use_scores = self.score_cache is not None and num_scored > 0
        for layers, lay in self._layer_groups_of(self.layer_group_for(B * n)):
            lg = layers.stop - layers.start
            rows, cols = lay[None, :, None], src[:, None, :]  # [B, lg, pages] page coordinates
            k = take(self.kv_cache[0], rows, cols).reshape(B * lg, pages * bs, h_kv, d)[:, :n]
            q_win = take(self.q_window, rows, slots[:, None, None], ring).flatten(0, 1)  # [B * lg, Q, H_q, D]
            g_prev = None
            if use_scores:
                g_prev = take(self.score_cache, rows, cols[..., :sp]).reshape(B * lg, sp * bs, h_kv)[:, :num_scored]
                g_prev = g_prev.transpose(1, 2)
            scores, g = self.scores_fn(q_win, k, g_prev, num_scored, first, self.scale, cfg, bs)
            idx = self.select_fn(scores, keep)  # [B * lg, H_kv, keep]
            if on_kept is not None:
                on_kept(layers.start, idx.view(B, lg, h_kv, keep))
            for kv in (0, 1):  # dest may reuse src pages: each launch reads every request before writing
                self.compact_batch_fn(self.kv_cache[kv, layers], src, n, idx.view(B, lg, h_kv, keep), dest)
            if self.score_cache is not None:  # the new G (not the old cached scores) moves with the kept entries
                g_kept = g.gather(2, idx).view(B, lg, h_kv, kp, bs).permute(0, 1, 3, 4, 2)
                self.score_cache[rows, dest[:, None, :]] = g_kept

    def stats(self) -> dict:
        return {
            "compressions": self.num_compressions,
            "graph_compressions": self.graph_compressions,
            "compression_seconds": self.total_seconds,
            "mean_compression_ms": 1000 * self.total_seconds / self.num_compressions if self.num_compressions else 0.0,
            **(self.store.stats() if self.store is not None else {}),
        }
