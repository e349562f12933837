"""The local scheduler: which tokens of which requests run in the next step, and which caches compress.

One step mixes decode tokens and prefill chunks under `max_num_batched_tokens` (vLLM v1's unified
view: each request just has tokens not yet computed). Running requests go first, in arrival order;
waiting requests are admitted FCFS while the token budget, the slots and the page pool allow.

Full KV (budget None): a request is admitted once its whole known sequence fits the free pages (not
only its first chunk) with some left for the running requests' growth (`headroom_steps`); admission is
FCFS, so a request at the head that does not fit holds the others back until enough of the running ones
have finished; requests grow freely; when one needs a page and none is free, the most recently
admitted request is preempted (pages freed, recomputed later; the prefix cache often makes that cheap).

Compressed PagedAttention (budget B pages): a request's cache never exceeds B + 1 pages once its prompt
is in, so the fresh pages it may still need are known (`future_pages`): the growth of its table to
its final size, plus, at its first compaction, a private page for every page of that table it shares
(shared pages are never written). The latter is read off the current sharing, so it is recomputed
every step: a new request that hits a page held by one other request makes that holder's need grow
too, and its admission pays for that. A request admitted *reserved* has its need set aside and is
never preempted; when the reservation does not fit, the request may still run *opportunistically*, and
is the first preempted. With `borrow` (the default) it runs on any free page, including pages reserved
requests are owed but have not taken yet, and a reserved request that needs one of them preempts the
latest opportunistic request to get it back (vLLM's behaviour for everyone: start now, recompute if
the memory is wanted). Without it, only on pages nobody reserved. Either way a reservation counts on
what preempting every opportunistic request would give back (`reclaimable_pages`), so reserved
requests are always served. A request preempted once must wait for a reservation: it has had its first
token, and readmitting it on borrowed pages would only thrash. A compressed request is never preempted
(its cache is lossy, it cannot be recomputed) and needs no more pages; an opportunistic request that
runs out of pages while decoding is compressed early, at the pages it holds, rather than preempted,
when the pages it then keeps for good are not owed to anyone.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from zipserve.workers.block_manager import BlockManager, CompactionPlan
from zipserve.workers.pages import admission_pages, num_pages, pages_to_come
from zipserve.workers.sequence import Sequence, Status


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_new_tokens: int  # tokens [seq.num_computed_tokens, + num_new_tokens) run this step

    @property
    def samples(self) -> bool:
        """True when the chunk reaches the end of the known tokens, so the step samples one more."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens

    @property
    def prefills(self) -> bool:
        """True unless the chunk is one decode token: it runs prompt tokens, or tokens recomputed after a
        preemption (read before the step counts the chunk as computed)."""
        return self.num_new_tokens > 1 or self.seq.num_computed_tokens < self.seq.num_prompt_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    compactions: list[CompactionPlan] = field(default_factory=list)  # early compressions, before the forward


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int | None = None, borrow: bool = True, headroom_steps: int = 0):
        self.bm = block_manager
        self.borrow = borrow
        self.headroom_steps = headroom_steps
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
    def _end_tokens(self, seq: Sequence) -> int:
        end = seq.num_tokens + seq.params.max_tokens - seq.num_output_tokens
        return min(end, self.max_model_len) if self.max_model_len is not None else end

    def future_pages(self, seq: Sequence, table_len: int | None = None, shared: int | None = None) -> int:
        """Fresh pages `seq` may still take from the pool, from its current table (or a hypothetical one
        of table_len pages of which `shared` are shared with other requests)."""
        if seq.compressed:
            return 0  # constant at its budget + 1 private pages
        if shared is None:
            shared = self.bm.holder_counts(seq.block_table)[2] if seq.budget_blocks is not None else 0
        n = len(seq.block_table) if table_len is None else table_len
        prefill = seq.num_tokens if not seq.decoding else 0
        return pages_to_come(n, self._end_tokens(seq), prefill, self.block_size, seq.budget_blocks, shared)

    def outstanding_pages(self) -> int:
        """Pages promised to reserved requests but not yet allocated."""
        # Compressed requests take no more (future_pages is 0): skip the call, they are most of a full batch.
        return sum(self.future_pages(s) for s in self.running if s.reserved and not s.compressed)

    def _borrowed(self) -> Counter:
        """How many opportunistic (unreserved, uncompressed) running requests hold each page; none without
        borrowing, where reservations never count on their pages (so nothing below is reclaimable)."""
        counts: Counter = Counter()
        if not self.borrow:
            return counts
        for s in self.running:
            if not s.reserved and not s.compressed and s.budget_blocks is not None:
                counts.update(s.block_table)
        return counts

    def reclaimable_pages(self, borrowed: Counter | None = None) -> int:
        """Pages that preempting every opportunistic request would give back to the pool (those only they hold)."""
        borrowed = self._borrowed() if borrowed is None else borrowed
        ref = self.bm.ref_count
        return sum(1 for b, n in borrowed.items() if n == ref[b])

    def _locked_by(self, seq: Sequence, borrowed: Counter) -> int:
        """Reclaimable pages that would stop being so if opportunistic `seq` became reserved or compressed."""
        ref = self.bm.ref_count
        return sum(1 for b in seq.block_table if borrowed[b] == ref[b])

    def available_pages(self, borrowed: Counter | None = None) -> int:
        """Pages a new reservation can count on: free pages plus what opportunistic requests borrow, less
        what reserved requests are owed. Never negative (engine.check_invariants)."""
        return self.bm.num_free_blocks + self.reclaimable_pages(borrowed) - self.outstanding_pages()

    def _spare_if_kept(self, seq: Sequence) -> int:
        """available_pages() once opportunistic `seq` keeps what it holds for good (reserved or compressed)."""
        borrowed = self._borrowed()
        return self.available_pages(borrowed) - self._locked_by(seq, borrowed)

    def _free_for(self, seq: Sequence) -> int:
        """Free pages `seq` may take now: any for a reserved request (or any opportunistic one, borrowing);
        else only pages nobody reserved."""
        if seq.reserved or self.borrow:
            return self.bm.num_free_blocks
        return self.bm.num_free_blocks - self.outstanding_pages()

    def hit_costs(self, cached: list[int]) -> tuple[int, int]:
        """(free cached pages a new request takes, pages whose sole holder will now have to privatise
        them at its first compaction): what taking these prefix hits costs the pool."""
        unheld, held_once, _ = self.bm.holder_counts(cached)
        return unheld, held_once

    def admission_pages(self, seq: Sequence, cached: list[int]) -> int:
        """Pages a reservation for a waiting `seq` with these prefix hits must set aside: its own need
        plus what its hits cost the pool (workers/pages.admission_pages, as the router computes it)."""
        unheld, held_once = self.hit_costs(cached)
        return admission_pages(seq.num_tokens, self._end_tokens(seq), self.block_size, seq.budget_blocks,
                               len(cached), unheld, held_once)

    # ---- the step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._upgrade_reservations()
        budget = self.max_num_batched_tokens
        # Borrowing: reserved (and compressed) requests first, so that the opportunistic ones they may
        # preempt for pages are all still unscheduled. Within each group (and without borrowing), arrival order.
        order = list(self.running)
        if self.borrow:
            order = [s for s in order if s.reserved or s.compressed] + [s for s in order if not (s.reserved or s.compressed)]
        for i, seq in enumerate(order):
            if budget <= 0:
                break
            if seq.status is not Status.RUNNING or seq.compressing:  # preempted for pages; or compacting
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self._make_room(seq, n, out, order[i:]):
                self.bm.append_slots(seq, n)
                out.chunks.append(ScheduledChunk(seq, n))
                budget -= n
        # Admit waiting requests only when nobody was preempted this step (else they would thrash).
        # available_pages() and the borrowed-page counts are computed once and then lowered by what each
        # admission costs at most (admission_pages is that bound), not recounted per admission.
        admitting = self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted
        borrowed = self._borrowed() if admitting else Counter()
        avail = self.available_pages(borrowed) if admitting else 0
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            if seq.num_pending:  # preempted with a token still on the device: admitted once it is known
                break
            cached = self.bm.cached_prefix(seq)
            start = len(cached) * self.block_size
            n = min(seq.num_tokens - start, budget)
            need = num_pages(start + n, self.block_size) - len(cached)
            unheld, held_once = self.hit_costs(cached)
            if self.bm.num_free_blocks - unheld < self._admission_need(seq, need, len(cached)):
                break
            cost = self.admission_pages(seq, cached) + self._hits_locked(cached, borrowed)
            reserve = seq.budget_blocks is not None and avail >= cost
            if not reserve:
                # Unreserved, it costs available_pages() what its hits cost their holders, and, when it may not
                # borrow, every page it takes. A preempted request waits for a reservation, unless nothing runs
                # (then nothing can thrash, and waiting could be forever).
                cost = held_once + (0 if self.borrow else need + unheld)
                if (seq.needs_reservation and self.running) or avail < cost:
                    break
            self.waiting.popleft()
            seq.num_computed_tokens = seq.num_cached_prompt_tokens = start
            self.bm.allocate(seq, cached, n)
            avail -= cost
            if not reserve and self.borrow:
                borrowed.update(seq.block_table)
            seq.reserved = reserve
            seq.needs_reservation = False
            if seq.budget_blocks is not None:
                seq.window_slot = self.free_window_slots.pop()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, n))
            budget -= n
        return out

    def _admission_need(self, seq: Sequence, first_chunk: int, cached: int) -> int:
        """Free pages a waiting request needs before it is admitted. A full-KV request: its whole known
        sequence (prompt, and any tokens it recomputes after a preemption), plus the growth headroom. Were
        it admitted on its first chunk alone, its later chunks could find the pool taken by the running
        requests' growth, and it would be preempted part-way through its prefill, its work lost. A
        compressed request: its first chunk (its reservation covers the rest)."""
        if seq.budget_blocks is not None:
            return first_chunk
        return num_pages(seq.num_tokens, self.block_size) - cached + self._growth_headroom()

    def _growth_headroom(self) -> int:
        """Pages kept free at a full-KV admission: `headroom_steps` of growth (a token a step) of the running
        requests and the one admitted, at most 5% of the pool (none on a pool under 20 pages). Only full-KV
        requests ask, and an engine runs full KV for all its requests or for none.
        Admitting into the last free pages makes the pool run out within a few steps, and the request just
        admitted is then the one preempted and recomputed. None while nothing runs, so the head of the queue
        always gets in once the running requests have drained."""
        if not self.headroom_steps or not self.running:
            return 0
        growing = len(self.running) + 1
        return min(num_pages(growing * self.headroom_steps, self.block_size), self.bm.num_blocks // 20)

    def _hits_locked(self, cached: list[int], borrowed: Counter) -> int:
        """Prefix hits that only several opportunistic requests hold: reclaimable now, not once a reserved
        request holds them too (hits held by one request are counted by admission_pages already)."""
        ref = self.bm.ref_count
        return sum(1 for b in cached if ref[b] >= 2 and borrowed[b] == ref[b])

    def _make_room(self, seq: Sequence, n: int, out: SchedulerOutput, rest: list[Sequence]) -> bool:
        """Ensure `seq` (rest[0]) has pages for n more entries: early-compress or preempt. Only requests not
        yet scheduled this step (`rest`, in this step's order) can be preempted."""
        while True:
            need = self.bm.blocks_needed(seq, n)
            if need == 0:  # most decode steps
                return True
            if need <= self._free_for(seq):
                return True
            decoding = n == 1 and seq.num_computed_tokens + 1 == seq.num_tokens
            if (decoding and seq.budget_blocks is not None and not seq.reserved and len(seq.block_table) >= 2
                    and seq.kv_len == len(seq.block_table) * self.block_size):
                spare = self._spare_if_kept(seq)
                plan = self.bm.plan_compaction(seq, len(seq.block_table) - 1, max_fresh=spare) if spare >= 0 else None
                if plan is not None:  # keep what it holds: its budget becomes the pages it has
                    seq.budget_blocks = len(seq.block_table) - 1
                    seq.reserved = True
                    out.compactions.append(plan)
                    self.num_early_compressions += 1
                    continue
            victim = self._last_opportunistic(rest)
            if victim is None:
                return False
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False

    def _last_opportunistic(self, candidates: list[Sequence]) -> Sequence | None:
        """The latest-admitted running request among `candidates` that may be preempted and would give a
        page back (one it alone holds); else the latest that may be preempted (pages several opportunistic
        requests share come back once all of them are gone)."""
        movable = [s for s in reversed(candidates)
                   if s.status is Status.RUNNING and not s.reserved and not s.compressed and not s.compressing]
        ref = self.bm.ref_count
        return next((s for s in movable if any(ref[b] == 1 for b in s.block_table)), movable[0] if movable else None)

    def _upgrade_reservations(self) -> None:
        """Opportunistic requests get a reservation, FCFS, once one fits."""
        if all(s.reserved or s.compressed or s.budget_blocks is None for s in self.running):
            return
        borrowed = self._borrowed()
        avail = self.available_pages(borrowed)
        for s in self.running:
            if s.reserved or s.compressed or s.budget_blocks is None:
                continue
            need = self.future_pages(s)
            if avail - self._locked_by(s, borrowed) >= need:
                s.reserved = True
                borrowed = self._borrowed()
                avail = self.available_pages(borrowed)

    def plan_compression(self, seq: Sequence) -> CompactionPlan | None:
        """After a step: compress `seq` if its cache reached B + 1 full pages (or a long prompt ended)."""
        B = seq.budget_blocks
        if B is None or seq.kv_len < (B + 1) * self.block_size:
            return None
        if seq.reserved:
            # Its privatisation pages are in its reservation; if opportunistic requests borrowed them, the
            # latest give them back.
            own = self.future_pages(seq)
            while True:
                spare = max(0, self.available_pages())
                plan = self.bm.plan_compaction(seq, B, spare_pages=spare, max_fresh=own + spare)
                if plan is not None:
                    return plan
                victim = self._last_opportunistic(self.running)
                if victim is None:
                    raise RuntimeError(f"request {seq.request_id}: its reserved pages are gone (accounting bug)")
                self._preempt(victim)
        # An opportunistic request keeps its pages for good once compressed: only pages nobody is owed may
        # go into that; else it is preempted (it is not compressed yet: it can recompute).
        spare = self._spare_if_kept(seq)
        plan = self.bm.plan_compaction(seq, B, spare_pages=spare, max_fresh=spare) if spare >= 0 else None
        if plan is None:
            self._preempt(seq)
            return None
        seq.reserved = True
        return plan

    def finish(self, seq: Sequence) -> None:
        """Retire a running or waiting request (finished or aborted) and free its pages."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._release_slot(seq)
        self._free(seq)
        seq.status = Status.FINISHED

    def _free(self, seq: Sequence) -> None:
        """Its pages back to the pool; it restarts from nothing computed (if it runs again)."""
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.decoding = False

    def _release_slot(self, seq: Sequence) -> None:
        if seq.window_slot is not None:
            self.free_window_slots.append(seq.window_slot)
            seq.window_slot = None

    def _preempt(self, seq: Sequence) -> None:
        assert not seq.compressed, "a compressed request cannot be recomputed"
        assert not seq.reserved, "a reserved request is never preempted"
        self.running.remove(seq)
        self._release_slot(seq)
        self._free(seq)
        seq.status = Status.WAITING
        seq.needs_reservation = self.borrow and seq.budget_blocks is not None
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
