"""Tokenizer loading and incremental detokenization (streamed text that never splits a character)."""

from __future__ import annotations

import os
from collections.abc import Callable

from workers.sequence import Sequence

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(path: str):
    """The folder's tokenizer, or None if it ships none (then only token-id prompts are accepted)."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def text_decoder(tokenizer) -> Callable[[list[int]], str]:
    """ids -> text without special tokens, exactly as `tokenizer.decode` gives it. For a fast tokenizer that
    does no clean-up that is its Rust backend's decode, called directly: transformers' wrapper around it
    (argument conversion, checks) cost 4x the decode itself, twice per token per request in every step."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def init_detokenizer(seq: Sequence) -> None:
    # A few prompt tokens of context so the first output token decodes with its leading space.
    seq.read_offset = seq.num_prompt_tokens
    seq.prefix_offset = max(0, seq.num_prompt_tokens - 6)
    seq.text = ""


def detokenize_step(decode: Callable[[list[int]], str], seq: Sequence, final: bool = False) -> str:
    """Append the text of newly generated tokens to seq.text; returns the new text (maybe "").

    Text ending in an incomplete UTF-8 sequence is held back until more tokens come, or `final`."""
    ids = seq.token_ids
    if seq.read_offset == len(ids):
        return ""
    prefix = decode(ids[seq.prefix_offset : seq.read_offset])
    full = decode(ids[seq.prefix_offset :])
    if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
        delta = full[len(prefix) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        seq.text += delta
        return delta
    return ""
