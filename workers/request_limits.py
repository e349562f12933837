"""What a prompt must be to be served, stated once: the engine (offline and behind a worker) and the HTTP
ingress (which answers 400 naming the field) both check prompts here. Pure Python, no torch."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine would refuse; `param` names the request field at fault (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def check_prompt(ids: list[int], vocab_size: int, max_model_len: int, max_prompt_tokens: int | None = None) -> None:
    """Raise RequestError unless `ids` is a non-empty list of token ids of the vocabulary that leaves room for
    at least one generated token (and, where a server caps prompts, fits max_prompt_tokens)."""
    if not ids:
        raise RequestError("prompt is empty", "prompt")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
        raise RequestError(f"prompt token ids must be integers in [0, {vocab_size})", "prompt")
    most, why = max_model_len - 1, f"max_model_len {max_model_len}"
    if max_prompt_tokens is not None and max_prompt_tokens < most:
        most, why = max_prompt_tokens, "this server's max_prompt_tokens"
    if len(ids) > most:
        raise RequestError(f"prompt has {len(ids)} tokens; prompts of at most {most} tokens are accepted ({why})",
                           "prompt")
