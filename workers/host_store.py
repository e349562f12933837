"""Evicted KV kept in host memory for recall (issue 27): one owner for the host pages and each request's store.

A compression evicts the same number of entries from every layer and KV head, so a request's store has the
same shape everywhere: per (layer, head) a list of closed pages (block_size entries each, oldest first) and
one open page being filled, all with the same fill. A page here holds one (layer, head)'s entries: K and V
[block_size, D] in pinned memory (on CUDA), positions and global scores beside them, and the per-channel
min and max of its keys on the device, which bound q.k for every key in it (Quest). Recall takes a
(layer, head)'s pages of highest bound out of the store; what the compression does not keep goes back in.

The pool is bounded. A compression whose evictions do not fit drops them (today's permanent eviction) and
counts it; no request fails for it. `host_pages` caps each request's closed pages per (layer, head): the
oldest go first, as the dense reference drops them (tests/dense_reference.py states the policy).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from zipserve.kernels.host_copy import copy_runs_ref
from zipserve.workers.transfer import HostLater, keep_for_stream, to_device


@dataclass
class RequestStore:
    """One request's store, per layer: closed page ids [H, n] (oldest first), the open page ids [H] or None
    (both on the device: choosing and moving pages needs no host round trip), and the open pages' fill
    (the same for every head of a layer, and for every layer between compressions)."""

    closed: list[torch.Tensor]
    open: list[torch.Tensor | None]
    fill: list[int]


@dataclass
class Taken:
    """Pages a compression recalls for a layer group: per (layer, head) r pages of block_size entries."""

    k: torch.Tensor  # [lg, r * bs, H, D] on the device
    v: torch.Tensor
    pos: torch.Tensor  # [lg, r * bs, H] int64
    g: torch.Tensor  # [lg, H, r * bs] fp32 (the global scores they were evicted with)


@dataclass
class HostKVStore:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_pages: int
    dtype: torch.dtype
    device: torch.device
    host_pages: int | None = None  # closed pages per request and (layer, head); None: no cap
    copy_runs: Callable = copy_runs_ref  # moves page contents (kernels/host_copy.py): the kernel set's
    requests: dict[str, RequestStore] = field(default_factory=dict)

    def __post_init__(self):
        pin = self.device.type == "cuda"
        bs, d = self.block_size, self.head_dim
        self.kv = torch.empty(self.num_pages, 2, bs, d, dtype=self.dtype, pin_memory=pin)
        self.pos = torch.empty(self.num_pages, bs, dtype=torch.long, pin_memory=pin)
        self.g = torch.zeros(self.num_pages, bs, dtype=torch.float32, pin_memory=pin)
        self.summary = torch.empty(self.num_pages, 2, d, dtype=torch.float32, device=self.device)  # key min, max
        self.free = list(range(self.num_pages - 1, -1, -1))  # a stack: the lowest ids are taken first
        # Page ids given back on the device (recalled, dropped, released) reach the free list once their
        # copy to the host has landed, after the reads queued before it: the host never waits for them.
        self._freed = HostLater()
        self.dropped_entries = 0  # evicted entries not kept (pool full, or beyond host_pages)
        self.pool_full = 0  # compressions whose evictions did not fit the pool
        self.recalled_pages = 0
        self.bytes_to_host = 0
        self.bytes_to_device = 0
        self.seconds = 0.0  # host time in take and put

    @staticmethod
    def page_bytes(block_size: int, head_dim: int, dtype: torch.dtype) -> int:
        """Host bytes of one (layer, head) page: K and V, positions, global scores."""
        return block_size * (2 * head_dim * torch.empty(0, dtype=dtype).element_size() + 8 + 4)

    def closed_pages(self, request_id: str) -> int:
        """Closed pages per (layer, head) of a request (between compressions, the same everywhere)."""
        st = self.requests.get(request_id)
        return 0 if st is None else min(c.shape[1] for c in st.closed)

    # ---- recall ------------------------------------------------------------------------------
    def take(self, request_id: str, layers: slice, q_win: torch.Tensor, r: int) -> Taken | None:
        """Remove and return, per (layer, head) of `layers`, its r closed pages of highest bound over the
        window queries q_win [lg, Q, H_q, D] (ties: the later closed). None if r is 0."""
        st = self.requests.get(request_id)
        if st is None or r <= 0:
            return None
        t0 = time.perf_counter()
        try:
            return self._take(st, layers, q_win, r)
        finally:
            self.seconds += time.perf_counter() - t0

    def _take(self, st: RequestStore, layers: slice, q_win: torch.Tensor, r: int) -> Taken:
        ids = torch.stack(st.closed[layers])  # [lg, H, n], on the device
        lg, H, n = ids.shape
        assert n >= r, "recall of more pages than stored"
        s = self.summary[ids]  # [lg, H, n, 2, D]
        q = q_win.float().unflatten(2, (H, -1)).permute(0, 2, 1, 3, 4).flatten(2, 3)  # [lg, H, Q * group, D]
        bound = torch.maximum(q[:, :, :, None] * s[:, :, None, :, 0], q[:, :, :, None] * s[:, :, None, :, 1])
        bound = bound.sum(-1).amax(2)  # [lg, H, n]
        # Highest bound first, the later page first among equals: a stable sort of the pages in reverse.
        best = n - 1 - bound.flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :r]
        best = best.sort(dim=-1).values  # [lg, H, r], in store order
        taken = torch.zeros(lg, H, n, dtype=torch.int8, device=ids.device).scatter_(2, best, 1)
        rest = ids.gather(2, taken.argsort(dim=2, stable=True)[..., : n - r])  # the others, in order
        for i, l in enumerate(range(layers.start, layers.stop)):
            keep_for_stream(st.closed[l])  # (made by an earlier compression, maybe on the other stream)
            st.closed[l] = rest[i]
        flat = ids.gather(2, best).flatten()
        bs, d = self.block_size, self.head_dim
        # The pages' contents move on the device's stream (copy_runs reads the pinned pool in place); their
        # ids reach the free list once their copy to the host lands, after these reads.
        kv, pos, g = self._gather(flat)
        self.bytes_to_device += kv.numel() * kv.element_size()
        self._freed.put(flat)
        self.recalled_pages += flat.numel()
        kv = kv.view(lg, H, r, 2, bs, d).permute(3, 0, 2, 4, 1, 5).reshape(2, lg, r * bs, H, d)
        return Taken(kv[0], kv[1], pos.view(lg, H, r * bs).transpose(1, 2), g.view(lg, H, r * bs))

    def _gather(self, pages: torch.Tensor):
        """The contents of host pages (ids [N]) on the device: K/V [N, 2, bs, D], positions and scores [N, bs]."""
        n, bs, d = pages.numel(), self.block_size, self.head_dim
        to = torch.arange(n, device=self.device)
        kv = torch.empty(n, 2, bs, d, dtype=self.dtype, device=self.device)
        pos = torch.empty(n, bs, dtype=torch.long, device=self.device)
        g = torch.empty(n, bs, dtype=torch.float32, device=self.device)
        self.copy_runs(kv, self.kv, to * (2 * bs * d), pages * (2 * bs * d), 2 * bs * d)
        self.copy_runs(pos, self.pos, to * bs, pages * bs, bs)
        self.copy_runs(g, self.g, to * bs, pages * bs, bs)
        return kv, pos, g

    def _scatter(self, pages: torch.Tensor, off: int, kv: torch.Tensor, pos: torch.Tensor, g: torch.Tensor | None,
                 start: int, end: int) -> None:
        """Write entries start:end of kv [N, 2, E, D], pos [N, E], g [N, E] (contiguous, on the device) into
        host pages (ids [N] on the device) from slot off on."""
        n, E, bs, d, m = kv.shape[0], kv.shape[2], self.block_size, self.head_dim, end - start
        rows = torch.arange(n, device=self.device)
        half = torch.arange(2, device=self.device)  # K, V
        page_kv = (pages * (2 * bs * d))[:, None] + half * (bs * d)  # [N, 2]
        src_kv = (rows * (2 * E * d))[:, None] + half * (E * d)
        self.copy_runs(self.kv, kv, (page_kv + off * d).flatten(), (src_kv + start * d).flatten(), m * d)
        self.copy_runs(self.pos, pos, pages * bs + off, rows * E + start, m)
        if g is not None:
            self.copy_runs(self.g, g, pages * bs + off, rows * E + start, m)

    # ---- eviction ----------------------------------------------------------------------------
    def admit(self, request_id: str, evicted: int) -> bool:
        """Whether a compression that evicts `evicted` entries from every (layer, head) may store them: the
        new pages it opens, for all layers and heads, are free. If not, they are dropped (counted) and the
        store stays as it was, the same for every layer."""
        self._reap()
        st = self.requests.get(request_id)
        fill = st.fill[0] if st is not None else 0
        new = -(-(evicted - min(evicted, (self.block_size - fill) % self.block_size)) // self.block_size)
        # Ids given back but still in flight to the host count as free: put waits for them if it must.
        if new * self.num_layers * self.num_kv_heads <= len(self.free) + self._freed.elements:
            return True
        self.dropped_entries += self.num_layers * self.num_kv_heads * evicted
        self.pool_full += 1
        return False

    def put(self, request_id: str, layers: slice, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
            g: torch.Tensor | None) -> None:
        """Store a layer group's evicted entries, in position order: k, v [lg, E, H, D]; pos [lg, E, H];
        g [lg, H, E] or None. The open page fills first, then new pages; full ones close."""
        t0 = time.perf_counter()
        try:
            self._put(request_id, layers, k, v, pos, g)
        finally:
            self.seconds += time.perf_counter() - t0

    def _put(self, request_id: str, layers: slice, k, v, pos, g) -> None:
        lg, E, H, _ = k.shape
        st = self.requests.get(request_id)
        if st is None:
            L = self.num_layers
            none = torch.empty(H, 0, dtype=torch.long, device=self.device)
            st = self.requests[request_id] = RequestStore([none] * L, [None] * L, [0] * L)
        if E == 0:
            return
        bs, fill = self.block_size, st.fill[layers.start]
        chunks, at = [], 0  # (start, end, offset in its page)
        while at < E:
            n = min(E - at, bs - fill)
            chunks.append((at, at + n, fill))
            at, fill = at + n, (fill + n) % bs
        kv = torch.stack([k, v], dim=2).permute(0, 3, 2, 1, 4).flatten(0, 1).to(self.dtype).contiguous()  # [lg * H, 2, E, D]
        pos = pos.transpose(1, 2).flatten(0, 1).contiguous()  # [lg * H, E] int64
        g = g.flatten(0, 1).float().contiguous() if g is not None else None
        keys = kv[:, 0].float()
        opened = torch.stack(st.open[layers]).flatten() if st.open[layers.start] is not None else None
        closing = []
        for start, end, off in chunks:
            if off == 0:
                if len(self.free) < lg * H:  # admitted against ids still in flight (a pool near full)
                    self._reap(wait=True)
                opened = to_device([self.free.pop() for _ in range(lg * H)], torch.long, self.device)
            self._scatter(opened, off, kv, pos, g, start, end)
            lo, hi = keys[:, start:end].amin(1), keys[:, start:end].amax(1)
            if off:  # (min and max extend: the open page's summary so far, and these)
                lo, hi = torch.minimum(lo, self.summary[opened, 0]), torch.maximum(hi, self.summary[opened, 1])
            self.summary[opened, 0], self.summary[opened, 1] = lo, hi
            if off + end - start == bs:
                closing.append(opened)
                opened = None
        self.bytes_to_host += kv.numel() * kv.element_size()
        for i, l in enumerate(range(layers.start, layers.stop)):
            closed = torch.cat([st.closed[l]] + [c.view(lg, H)[i, :, None] for c in closing], dim=1)
            if self.host_pages is not None and closed.shape[1] > self.host_pages:
                drop = closed[:, : closed.shape[1] - self.host_pages]
                self._freed.put(drop.flatten())
                self.dropped_entries += drop.numel() * bs
                closed = closed[:, closed.shape[1] - self.host_pages:]
            keep_for_stream(st.closed[l])
            if st.open[l] is not None:
                keep_for_stream(st.open[l])
            st.closed[l] = closed
            st.open[l] = opened.view(lg, H)[i] if opened is not None else None
            st.fill[l] = fill

    def release(self, request_id: str) -> None:
        """A request ended or was aborted: its pages go back to the pool."""
        st = self.requests.pop(request_id, None)
        if st is None:
            return
        for closed, opened in zip(st.closed, st.open):
            self._freed.put(closed.flatten())
            if opened is not None:
                self._freed.put(opened)

    def _reap(self, wait: bool = False) -> None:
        """Give the page ids whose copy to the host has landed back to the free list."""
        for ids in self._freed.ready(wait):
            self.free.extend(ids.tolist())

    def check_invariants(self, live: set) -> None:
        """Every page is free or held by one live request's store, once; a store's layers agree."""
        self._reap(wait=True)
        held = []
        for rid, st in self.requests.items():
            assert rid in live, f"request {rid} ended but holds recall pages"
            assert len({c.shape[1] for c in st.closed}) == 1 and len(set(st.fill)) == 1, f"{rid}: layers disagree"
            for closed, opened in zip(st.closed, st.open):
                held += closed.flatten().tolist() + (opened.tolist() if opened is not None else [])
        assert len(held) == len(set(held)), "a recall page held twice"
        assert not set(held) & set(self.free) and len(held) + len(self.free) == self.num_pages, "recall pages lost"

    def stats(self) -> dict:
        self._reap()
        used = self.num_pages - len(self.free)
        return {"recall_host_pages_used": used, "recall_host_pages_total": self.num_pages,
                "recall_host_bytes": used * self.page_bytes(self.block_size, self.head_dim, self.dtype),
                "recalled_pages": self.recalled_pages, "recall_dropped_entries": self.dropped_entries,
                "recall_pool_full": self.pool_full,
                "recall_bytes_to_host": self.bytes_to_host, "recall_bytes_to_device": self.bytes_to_device,
                "recall_seconds": self.seconds}
