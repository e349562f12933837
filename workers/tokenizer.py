"""Tokenizer loading and incremental detokenization (streamed text that never splits a character)."""

from __future__ import annotations

import os

from workers.sequence import Sequence

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(path: str):
    """The folder's tokenizer, or None if it ships none (then only token-id prompts are accepted)."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def init_detokenizer(seq: Sequence) -> None:
    # A few prompt tokens of context so the first output token decodes with its leading space.
    seq.read_offset = seq.num_prompt_tokens
    seq.prefix_offset = max(0, seq.num_prompt_tokens - 6)
    seq.text = ""


def detokenize_step(tokenizer, seq: Sequence, final: bool = False) -> str:
    """Append the text of newly generated tokens to seq.text; returns the new text (maybe "").

    Text ending in an incomplete UTF-8 sequence is held back until more tokens come, or `final`."""
    ids = seq.token_ids
    if seq.read_offset == len(ids):
        return ""
    prefix = tokenizer.decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=True)
    full = tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=True)
    if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
        delta = full[len(prefix) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        seq.text += delta
        return delta
    return ""
