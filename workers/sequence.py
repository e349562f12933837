"""A request's state as data: tokens, progress, pages. Owners (scheduler, block manager) change it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from workers.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt + generated so far
    num_prompt_tokens: int
    params: SamplingParams
    arrival: int  # admission order (FCFS tie-break)
    status: Status = Status.WAITING
    # Tokens whose K/V are in the cache (or are being written by the current step). The next step
    # runs tokens [num_computed_tokens, len(token_ids)).
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Chained hashes of this request's full pages, in order (prompt and generated pages alike).
    block_hashes: list[bytes] = field(default_factory=list)
    num_committed_blocks: int = 0  # leading pages already offered to the prefix cache
    num_cached_prompt_tokens: int = 0  # prefix-cache hit at the last admission
    num_preemptions: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # Per generated token: {token_id: logprob} (sampled first), when params.logprobs is set.
    logprobs: list[dict[int, float]] = field(default_factory=list)
    generator: object | None = None  # torch.Generator for seeded sampling
    created: float = field(default_factory=time.monotonic)
    # Detokenization state (see workers/detokenizer.py)
    text: str = ""
    read_offset: int = 0
    prefix_offset: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
