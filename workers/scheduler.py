"""The local scheduler: which tokens of which requests run in the next step, and which caches compress.

One step mixes decode tokens and prefill chunks under `max_num_batched_tokens` (vLLM v1's unified
view: each request just has tokens not yet computed). Running requests go first, in arrival order;
waiting requests are admitted FCFS while the token budget, the slots and the page pool allow.

Full KV (budget None): requests grow freely; when one needs a page and none is free, the most recently
admitted request is preempted (pages freed, recomputed later; the prefix cache often makes that cheap).

Compressed PagedAttention (budget B pages): a request's cache never exceeds B + 1 pages once its prompt
is in, so its peak page need is known at admission (`peak_pages`). A request admitted *reserved* has
that peak set aside and is never preempted; when the reservation does not fit, the request may still
run *opportunistically* on pages nobody reserved, and is the first preempted. A compressed request is
never preempted (its cache is lossy, it cannot be recomputed); an opportunistic request that runs out
of pages while decoding is compressed early, at the pages it holds, rather than preempted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from workers.block_manager import BlockManager, CompactionPlan
from workers.sequence import Sequence, Status


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_new_tokens: int  # tokens [seq.num_computed_tokens, + num_new_tokens) run this step

    @property
    def samples(self) -> bool:
        """True when the chunk reaches the end of the known tokens, so the step samples one more."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    compactions: list[CompactionPlan] = field(default_factory=list)  # early compressions, before the forward

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks and not self.compactions


def _pages(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int | None = None):
        self.bm = block_manager
        self.block_size = block_manager.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_window_slots = list(range(max_num_seqs - 1, -1, -1))
        self.num_preemptions = 0
        self.num_early_compressions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- page reservations -----------------------------------------------------------------
    def peak_pages(self, seq: Sequence, num_hit_pages: int) -> int:
        """Most pages `seq` may own at once from now on (prefix-cache hits are not owned)."""
        bs, B = self.block_size, seq.budget_blocks
        end = seq.num_tokens + seq.params.max_tokens - seq.num_output_tokens
        if self.max_model_len is not None:
            end = min(end, self.max_model_len)
        total = _pages(end, bs) - num_hit_pages
        if B is None or _pages(end, bs) <= B + 1:
            return total  # never compresses
        # Prompt pages while prefilling, then B + 1 private pages after the first compaction.
        return max(_pages(seq.num_tokens, bs) - num_hit_pages, B + 1)

    def outstanding_pages(self) -> int:
        """Pages promised to reserved requests but not yet allocated."""
        return sum(max(0, s.peak_pages - s.num_owned_pages) for s in self.running if s.reserved)

    def available_pages(self) -> int:
        """Free pages nobody has reserved."""
        return self.bm.num_free_blocks - self.outstanding_pages()

    # ---- the step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._upgrade_reservations()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.compressing:  # waits for its compaction to land
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self._make_room(seq, n, out, i):
                self.bm.append_slots(seq, n)
                out.chunks.append(ScheduledChunk(seq, n))
                budget -= n
                i += 1
            elif seq.status is Status.RUNNING:
                i += 1  # stays, waits for pages
        # Admit waiting requests only when nobody was preempted this step (else they would thrash).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            cached = self.bm.cached_prefix(seq)
            start = len(cached) * self.block_size
            n = min(seq.num_tokens - start, budget)
            need = _pages(start + n, self.block_size) - len(cached)
            reused_free = sum(1 for b in cached if self.bm.ref_count[b] == 0)
            avail = self.available_pages() - reused_free
            reserve = seq.budget_blocks is not None and avail >= self.peak_pages(seq, len(cached))
            if not reserve and avail < need:
                break
            self.waiting.popleft()
            self.bm.allocate(seq, cached, n)
            if reserve:
                seq.reserved, seq.peak_pages = True, self.peak_pages(seq, len(cached))
            if seq.budget_blocks is not None:
                seq.window_slot = self.free_window_slots.pop()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, n))
            budget -= n
        return out

    def _make_room(self, seq: Sequence, n: int, out: SchedulerOutput, index: int) -> bool:
        """Ensure `seq` (at running[index]) has pages for n more entries: early-compress or preempt.

        Only requests not yet scheduled this step (index and later) can be preempted."""
        while True:
            need = self.bm.blocks_needed(seq, n)
            avail = self.bm.num_free_blocks if seq.reserved else self.available_pages()
            if need <= avail:
                return True
            decoding = n == 1 and seq.num_computed_tokens + 1 == seq.num_tokens
            if (decoding and seq.budget_blocks is not None and not seq.reserved and len(seq.block_table) >= 2
                    and seq.kv_len == len(seq.block_table) * self.block_size):
                plan = self.bm.plan_compaction(seq, len(seq.block_table) - 1)
                if plan is not None:  # keep what it holds: its budget becomes the pages it has
                    seq.budget_blocks = len(seq.block_table) - 1
                    seq.reserved, seq.peak_pages = True, len(seq.block_table)
                    out.compactions.append(plan)
                    self.num_early_compressions += 1
                    continue
            victim = next((s for s in reversed(self.running[index:]) if not s.reserved and not s.compressed), None)
            if victim is None:
                return False
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False

    def _upgrade_reservations(self) -> None:
        """Opportunistic requests get a reservation, FCFS, once one fits."""
        for s in self.running:
            if s.reserved or s.budget_blocks is None:
                continue
            hits = len(s.block_table) - s.num_owned_pages
            peak = self.peak_pages(s, hits)
            if self.available_pages() >= peak - s.num_owned_pages:
                s.reserved, s.peak_pages = True, peak

    def plan_compression(self, seq: Sequence) -> CompactionPlan | None:
        """After a step: compress `seq` if its cache reached B + 1 full pages (or a long prompt ended)."""
        B = seq.budget_blocks
        if B is None or seq.kv_len < (B + 1) * self.block_size:
            return None
        plan = self.bm.plan_compaction(seq, B, spare_pages=max(0, self.available_pages()))
        while plan is None:  # private pages short (shared pages to replace): opportunistic ones yield
            victim = next((s for s in reversed(self.running) if not s.reserved and not s.compressed and s is not seq), None)
            if victim is None:
                raise RuntimeError(f"request {seq.request_id}: no free page to compress into; the pool is too small "
                                   f"for its budget of {B} pages")
            self._preempt(victim)
            plan = self.bm.plan_compaction(seq, B)
        seq.reserved, seq.peak_pages = True, B + 1
        return plan

    def finish(self, seq: Sequence) -> None:
        """Retire a running or waiting request (finished or aborted) and free its pages."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._release_slot(seq)
        self.bm.free(seq)
        seq.status = Status.FINISHED

    def _release_slot(self, seq: Sequence) -> None:
        if seq.window_slot is not None:
            self.free_window_slots.append(seq.window_slot)
            seq.window_slot = None

    def _preempt(self, seq: Sequence) -> None:
        assert not seq.compressed, "a compressed request cannot be recomputed"
        self.running.remove(seq)
        self._release_slot(seq)
        self.bm.free(seq)
        seq.status = Status.WAITING
        seq.reserved = False
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
