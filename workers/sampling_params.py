"""Per-request sampling settings, validated at construction so bad input fails before any work."""

from __future__ import annotations

from dataclasses import dataclass, field


GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token (0 = only the sampled token's)
    prompt_logprobs: int | None = None  # top-n logprobs per prompt token (its prompt is then not served from cache)
    presence_penalty: float = 0.0  # OpenAI: minus this once for every token already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count in the output so far
    repetition_penalty: float = 1.0  # vLLM / transformers: over prompt and output, logit / p if > 0 else * p
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to the logits, each in [-100, 100]
    min_tokens: int = 0  # EOS and stop_token_ids held back until this many tokens are out
    bad_words: list[str] = field(default_factory=list)  # never generated (workers/bad_words.py)
    allowed_token_ids: list[int] | None = None  # vLLM's: sample only among these
    budget_blocks: int | None = None  # per-request KV budget in pages (None = the engine's)
    recall_pages: int | None = None  # pages recalled per (layer, head) at each compression, up to the engine's
    # compression.recall.pages (None = the engine's; 0 = none, and this request's evictions are not kept)
    structured: dict | None = None  # one output constraint (workers/grammar.py), checked by the engine

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(_is_number(self.temperature) and self.temperature >= 0, "temperature must be >= 0", self.temperature)
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]", self.top_p)
        _check(_is_int(self.top_k) and (self.top_k >= 0 or self.top_k == -1), "top_k must be -1, 0 or a positive integer", self.top_k)
        if self.top_k == -1:
            self.top_k = 0
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1]", self.min_p)
        _check(self.seed is None or _is_int(self.seed), "seed must be an integer or None", self.seed)
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens must be a positive integer", self.max_tokens)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings", self.stop)
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be non-negative integers", self.stop_token_ids)
        _check(self.budget_blocks is None or (_is_int(self.budget_blocks) and self.budget_blocks >= 1),
               "budget_blocks must be None or a positive integer", self.budget_blocks)
        _check(self.recall_pages is None or (_is_int(self.recall_pages) and self.recall_pages >= 0),
               "recall_pages must be None or a non-negative integer", self.recall_pages)
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20), "logprobs must be None or in [0, 20]", self.logprobs)
        _check(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= 20),
               "prompt_logprobs must be None or in [0, 20]", self.prompt_logprobs)
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(_is_number(v) and -2 <= v <= 2, f"{name} must be in [-2, 2]", v)
        _check(_is_number(self.repetition_penalty) and 0 < self.repetition_penalty <= 10,
               "repetition_penalty must be in (0, 10]", self.repetition_penalty)
        self.logit_bias = dict(self.logit_bias or {})
        _check(all(_is_int(t) and t >= 0 and _is_number(v) and -100 <= v <= 100 for t, v in self.logit_bias.items()),
               "logit_bias must map token ids to values in [-100, 100]", self.logit_bias)
        _check(self.allowed_token_ids is None or (isinstance(self.allowed_token_ids, list) and self.allowed_token_ids
                                                  and all(_is_int(t) and t >= 0 for t in self.allowed_token_ids)),
               "allowed_token_ids must be a non-empty list of token ids", self.allowed_token_ids)
        self.bad_words = list(self.bad_words or [])
        _check(all(isinstance(w, str) and w.strip() for w in self.bad_words), "bad_words must be non-empty strings",
               self.bad_words)
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
               "min_tokens must be an integer in [0, max_tokens]", self.min_tokens)

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 are greedy: dividing logits by them overflows to inf (as in vLLM)."""
        return self.temperature < GREEDY_BELOW


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # rejects NaN


def _check(ok: bool, message: str, value) -> None:
    if not ok:
        raise ValueError(f"{message}, got {value!r}")
