"""What the engine hands back: per request, the tokens and text so far and what is new this step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens so far
    text: str
    finished: bool
    finish_reason: str | None = None  # "stop" (EOS, stop token or string), "length", "abort"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    new_token_ids: list[int] = field(default_factory=list)  # generated since the previous step
    new_text: str = ""
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    logprobs: list[dict[int, float]] | None = None
    prompt: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
