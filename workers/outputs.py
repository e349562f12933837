"""What the engine hands back: per request, the tokens and text so far and what is new this step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


class SpanView(Sequence):
    """A read-only view of items [start, end) of an append-only list (tokens, logprobs), made in O(1).

    A request's tokens and logprobs are only ever appended to, so the view stays what it was when made. Intermediate
    outputs carry one instead of a copy: copying every request's whole output at every step would cost
    O(length) per token (seconds per request at 32k-token reasoning lengths)."""

    __slots__ = ("_tokens", "_start", "_end")

    def __init__(self, tokens: list[int], start: int, end: int | None = None):
        self._tokens, self._start, self._end = tokens, start, len(tokens) if end is None else end

    def __len__(self) -> int:
        return self._end - self._start

    def __getitem__(self, i):
        if isinstance(i, slice):  # copies only the items asked for (a request's newest tokens, say)
            r = range(self._start, self._end)[i]
            return self._tokens[r.start : r.stop : r.step] if r.step > 0 or r.stop >= 0 else \
                [self._tokens[j] for j in r]
        n = len(self)
        if not -n <= i < n:
            raise IndexError("token index out of range")
        return self._tokens[self._start + (i % n)]

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    def __add__(self, other):
        return list(self) + list(other)

    def __radd__(self, other):
        return list(other) + list(self)

    def __repr__(self) -> str:
        return repr(list(self))


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int] | SpanView
    token_ids: list[int] | SpanView  # generated tokens so far (a list once finished)
    text: str
    finished: bool
    finish_reason: str | None = None  # "stop" (EOS, stop token or string), "length", "abort"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    new_token_ids: list[int] = field(default_factory=list)  # generated since the previous step
    new_text: str = ""
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    logprobs: list[dict[int, float]] | None = None
    prompt: str | None = None
    # With params.prompt_logprobs, on the output carrying the first generated token: per prompt token from the
    # second on, {token: logprob} (the prompt's own token first, then the top-n).
    prompt_logprobs: list[dict[int, float]] | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
