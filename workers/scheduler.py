"""The local scheduler: which tokens of which requests run in the next step.

One step mixes decode tokens and prefill chunks under `max_num_batched_tokens` (vLLM v1's unified
view: each request just has tokens not yet computed). Running requests go first, in arrival order;
when one needs a page and none is free, the most recently admitted request is preempted (its pages
freed, to be recomputed later; the prefix cache often makes that cheap). Waiting requests are admitted
in FCFS order while the token budget, the slot count and the page pool allow.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from workers.block_manager import BlockManager
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

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.bm.can_allocate(self.bm.blocks_needed(seq, seq.num_computed_tokens + n)):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.bm.append_slots(seq, n)
                out.chunks.append(ScheduledChunk(seq, n))
                budget -= n
                i += 1
        # Admit waiting requests only when nobody was preempted this step (else they would thrash).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            cached = self.bm.cached_prefix(seq)
            start = len(cached) * self.bm.block_size
            n = min(seq.num_tokens - start, budget)
            need = -(-(start + n) // self.bm.block_size) - len(cached)
            if not self.bm.can_allocate(need, cached):
                break
            self.waiting.popleft()
            self.bm.allocate(seq, cached, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, n))
            budget -= n
        return out

    def finish(self, seq: Sequence) -> None:
        """Retire a running or waiting request (finished or aborted) and free its pages."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.bm.free(seq)
        seq.status = Status.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
