"""A request's state as data: tokens, progress, pages. Owners (scheduler, block manager) change it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from zipserve.workers.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt + generated so far (whose values are known on the host)
    num_prompt_tokens: int
    params: SamplingParams
    arrival: int  # admission order (FCFS tie-break)
    status: Status = Status.WAITING
    # Tokens whose K/V are in the cache (or are being written by the current step). The next step
    # runs tokens [num_computed_tokens, num_tokens).
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Chained hashes of this request's full pages, in order (prompt and generated pages alike).
    block_hashes: list[bytes] = field(default_factory=list)
    num_committed_blocks: int = 0  # leading pages already offered to the prefix cache
    num_cached_prompt_tokens: int = 0  # prefix-cache hit at the last admission
    # Compressed PagedAttention. The cache holds kv_len = num_computed_tokens - num_evicted entries;
    # positions stay the token indices (never renumbered).
    budget_blocks: int | None = None  # pages of history kept (None = full KV)
    num_evicted: int = 0
    num_scored: int = 0  # leading cache entries kept by a past compression (they carry global scores)
    num_compressions: int = 0
    window_slot: int | None = None  # row of the query-window buffer (compressing requests only)
    reserved: bool = False  # admitted with its peak pages reserved (never preempted)
    needs_reservation: bool = False  # preempted: readmitted only with a reservation (no thrashing)
    decoding: bool = False  # its prompt (and any recomputed tokens) are in; set when it samples
    compressing: bool = False  # its compaction is in flight on the compressor's stream: not schedulable
    # Async scheduling: tokens sampled but still on the device (counted in num_tokens, not yet in
    # token_ids), and where the latest one is: (the step's pending record, its row) -- the next step's
    # input for this request is read from there on the device.
    num_pending: int = 0
    pending_row: tuple[object, int] | None = None
    num_preemptions: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # Per generated token: {token_id: logprob} (sampled first), when params.logprobs is set.
    logprobs: list[dict[int, float]] = field(default_factory=list)
    # Per prompt token, from the second on (the first has none): the same, when params.prompt_logprobs is set.
    prompt_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    bad_word_ids: list[list[int]] = field(default_factory=list)  # params.bad_words as token sequences
    generator: object | None = None  # torch.Generator for seeded sampling
    created: float = field(default_factory=time.monotonic)
    # Its text, and the state that streams it, live in workers/output_processor.py (OutputProcessor.texts).

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def kv_len(self) -> int:
        return self.num_computed_tokens - self.num_evicted

    @property
    def compressed(self) -> bool:
        return self.num_compressions > 0

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
