"""The KV page pool: ref-counted pages, chained page hashes for prefix caching, LRU reuse.

The block manager alone owns pages and their reference counts; others ask it small questions
(`holder_counts`, `cached_hashes`). A page holds `block_size` tokens of K/V for every layer. A full
page whose tokens are known carries its chained hash (workers/pages.py). Pages whose last user
finished keep their hash and stay reusable until the pool needs them: free pages form an LRU queue,
and taking one evicts its hash.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from zipserve.workers.pages import page_hashes
from zipserve.workers.sequence import Sequence


@dataclass
class CompactionPlan:
    """Move `seq`'s kept cache entries from `src_table` into `dest_table` (keep_pages full pages + an
    empty working page); `release` are the pages to drop once the data has moved.

    The sequence's bookkeeping is updated when the plan is made (so this step's scheduling already sees
    the compacted cache); the plan keeps the values from before, which the compressor needs."""

    seq: Sequence
    src_table: list[int]
    dest_table: list[int]
    release: list[int]
    kv_len: int  # entries in the source cache
    keep: int  # entries kept = keep_pages * block_size
    num_fresh: int  # pages newly allocated (for shared pages, or to spare cached prefix pages)
    num_scored: int  # leading source entries that carry a global score
    first: bool  # the request's first compression
    num_positions: int = 0  # tokens computed (the source's last entry is at position num_positions - 1)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        # Free pages in eviction order (head evicted first). Pages here have ref_count 0.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found cached

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block)

    def holder_counts(self, blocks) -> tuple[int, int, int]:
        """(pages nobody holds, pages one request holds, pages several hold) among `blocks`."""
        counts = [0, 0, 0]
        for b in blocks:
            counts[min(self.ref_count[b], 2)] += 1
        return counts[0], counts[1], counts[2]

    def cached_hashes(self) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """Hashes of every cached page, and of those among them that nobody / one request holds: what a
        router needs to know what a prefix hit costs this pool (workers/pages.admission_pages)."""
        unheld, held_once = [], []
        for h, b in self.hash_to_block.items():
            if self.ref_count[b] < 2:
                (unheld if self.ref_count[b] == 0 else held_once).append(h)
        return list(self.hash_to_block), unheld, held_once

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """New pages `seq` needs so its table covers its cache plus `num_new_tokens` entries."""
        return max(0, -(-(seq.kv_len + num_new_tokens) // self.block_size) - len(seq.block_table))

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Pages holding a cached prefix of `seq`'s tokens (no references taken).

        At least one token is always left to compute, since its logits are needed."""
        if not self.enable_prefix_cache or seq.params.prompt_logprobs is not None:  # (its prompt must be scored)
            return []
        seq.block_hashes = page_hashes(seq.token_ids, self.block_size, seq.block_hashes)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits = []
        for h in seq.block_hashes[:max_blocks]:
            block = self.hash_to_block.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    # ---- mutations -----------------------------------------------------------------------
    def allocate(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> None:
        """Give a fresh sequence its cached prefix pages plus pages for its first chunk (the scheduler has
        counted the cached entries as computed)."""
        assert not seq.block_table and seq.num_computed_tokens == len(cached) * self.block_size
        for b in cached:
            self._take(b)
            seq.block_table.append(b)
        seq.num_committed_blocks = len(cached)
        if self.enable_prefix_cache:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += seq.num_computed_tokens
        self.append_slots(seq, num_new_tokens)

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        need = self.blocks_needed(seq, num_new_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(f"out of KV pages: need {need}, have {self.num_free_blocks}")
        for _ in range(need):
            seq.block_table.append(self._pop_free())

    def plan_compaction(self, seq: Sequence, keep_pages: int, spare_pages: int = 0,
                        max_fresh: int | None = None) -> CompactionPlan | None:
        """Choose private pages to pack `seq`'s kept entries into; None if the pool is too short.

        Shared pages are never written. The request's own unhashed pages are reused first; pages that
        hold a cached prefix are spared by using free pages instead while `spare_pages` allows (so the
        prefix stays cached after the request compresses), and are otherwise overwritten, losing their
        hash. Fresh pages stand in for shared ones; `max_fresh` caps the fresh pages it may take (what
        the request has reserved plus what nobody has): None if the shared ones alone need more."""
        want = keep_pages + 1
        writable = [b for b in seq.block_table if self.ref_count[b] == 1]
        dest = [b for b in writable if self.block_hash[b] is None][:want]
        # Overwrite cached pages from the end of the table: the leading ones keep a shorter prefix chain.
        hashed = [b for b in writable if self.block_hash[b] is not None][::-1]
        need = want - len(dest)
        required = max(0, need - len(hashed))
        fresh = required + max(0, min(need - required, spare_pages - required))
        limit = self.num_free_blocks if max_fresh is None else min(max_fresh, self.num_free_blocks)
        if required > limit:
            return None
        fresh = min(fresh, limit)
        for b in hashed[: need - fresh]:
            del self.hash_to_block[self.block_hash[b]]
            self.block_hash[b] = None
            dest.append(b)
        dest += [self._pop_free() for _ in range(fresh)]
        used = set(dest)
        plan = CompactionPlan(seq, list(seq.block_table), dest, [b for b in seq.block_table if b not in used],
                              seq.kv_len, keep_pages * self.block_size, fresh, seq.num_scored, not seq.compressed,
                              seq.num_computed_tokens)
        seq.block_table = dest
        seq.num_evicted += plan.kv_len - plan.keep
        seq.num_scored = plan.keep
        seq.num_compressions += 1
        return plan

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each page (after a compaction has moved their data out)."""
        for b in reversed(blocks):
            self.ref_count[b] -= 1
            assert self.ref_count[b] >= 0, f"double free of page {b}"
            if self.ref_count[b] == 0:
                self.free_queue[b] = None

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Register hashes for `seq`'s pages that became full and computed this step."""
        if not self.enable_prefix_cache or seq.num_evicted:  # a compressed cache is no longer a prefix
            return
        n_full = seq.num_computed_tokens // self.block_size
        if n_full <= seq.num_committed_blocks:
            return
        if len(seq.block_hashes) < n_full:
            seq.block_hashes = page_hashes(seq.token_ids, self.block_size, seq.block_hashes)
        assert len(seq.block_hashes) >= n_full, f"{seq.request_id}: a computed page holds a token not yet known"
        for i in range(seq.num_committed_blocks, n_full):
            block, h = seq.block_table[i], seq.block_hashes[i]
            if self.block_hash[block] is None and h not in self.hash_to_block:
                self.block_hash[block] = h
                self.hash_to_block[h] = block
        seq.num_committed_blocks = n_full

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; its pages become free (tail first in eviction order)."""
        self.release(seq.block_table)
        seq.block_table = []
        seq.num_committed_blocks = 0

    # ---- internals -----------------------------------------------------------------------
    def _take(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.free_queue[block]
        self.ref_count[block] += 1

    def _pop_free(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict the page's cached identity
            del self.hash_to_block[h]
            self.block_hash[block] = None
        self.ref_count[block] = 1
        return block

    def check_invariants(self, seqs: list[Sequence], pending_release: list[int] = ()) -> None:
        """Raise AssertionError if refs, free queue or hashes disagree with the live tables (plus the
        references that in-flight compactions still hold on pages they will release)."""
        refs = [0] * self.num_blocks
        for b in pending_release:
            refs[b] += 1
        for s in seqs:
            assert len(set(s.block_table)) == len(s.block_table), f"{s.request_id}: page twice in table"
            for b in s.block_table:
                refs[b] += 1
        assert refs == self.ref_count, "ref counts disagree with page tables"
        free = {b for b in range(self.num_blocks) if refs[b] == 0}
        assert free == set(self.free_queue), "free queue disagrees with ref counts"
        for h, b in self.hash_to_block.items():
            assert self.block_hash[b] == h, f"hash index broken at page {b}"
        assert sum(h is not None for h in self.block_hash) == len(self.hash_to_block)
