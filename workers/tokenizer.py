"""Tokenizer loading, and what decodes ids to text (streamed text: workers/output_processor.py)."""

from __future__ import annotations

import os
from collections.abc import Callable

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(path: str):
    """The folder's tokenizer, or None if it ships none (then only token-id prompts are accepted)."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def fast_backend(tokenizer):
    """The `tokenizers.Tokenizer` whose own decode is the tokenizer's text, or None: a slow tokenizer has none,
    and one that cleans up spaces (transformers does that in Python) changes its backend's text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    return backend


def text_decoder(tokenizer) -> Callable[[list[int]], str]:
    """ids -> text without special tokens, exactly as `tokenizer.decode` gives it. For a fast tokenizer that
    does no clean-up that is its Rust backend's decode, called directly: transformers' wrapper around it
    (argument conversion, checks) cost 4x the decode itself."""
    backend = fast_backend(tokenizer)
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


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
