"""Tokenizer loading and incremental detokenization (streamed text that never splits a character)."""

from __future__ import annotations

import os
from collections.abc import Callable

from zipserve.workers.sequence import Sequence

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


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's scheme): printable Latin-1 bytes stand for
    themselves, the other bytes map to code points from 256 on, in order."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = (b for b in range(256) if b not in keep)
    return {**{chr(b): b for b in keep}, **{chr(256 + i): b for i, b in enumerate(extra)}}


def token_piece(tokenizer) -> Callable[[int], tuple[str, bytes]]:
    """token id -> (its text, its exact UTF-8 bytes), as logprobs report tokens. Byte-level BPE tokens map back
    to their bytes exactly (a token holding part of a character has bytes that are not valid UTF-8 alone; its
    text then shows U+FFFD); other tokenizers decode the token alone."""
    import functools
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = json.loads(backend.to_str()).get("decoder") or {} if backend is not None else {}
    byte_level = decoder.get("type") == "ByteLevel" or any(
        d.get("type") == "ByteLevel" for d in decoder.get("decoders", []) or [])
    alphabet = _byte_level_alphabet()

    @functools.lru_cache(maxsize=1 << 16)
    def piece(token_id: int) -> tuple[str, bytes]:
        tok = tokenizer.convert_ids_to_tokens(token_id)
        if byte_level and tok is not None and all(c in alphabet for c in tok):
            raw = bytes(alphabet[c] for c in tok)
            return raw.decode("utf-8", errors="replace"), raw
        text = tokenizer.decode([token_id])
        return text, text.encode("utf-8")

    return piece
