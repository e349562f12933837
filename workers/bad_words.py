"""Bad words (vLLM's `bad_words`): token sequences a request must not generate.

Each word is tokenized as written and with a leading space (how it appears mid-text), as vLLM does. A
one-token sequence is banned at every step; a longer one bans its last token wherever the request's output
ends with the rest. The second needs the step before's token on the host, so a batch holding such a
request appends that token before it samples (as grammars do: workers/engine.py). The ban is one indexed
write of -inf into (a copy of) the batch's logits, after penalties and before grammar masks.
"""

from __future__ import annotations

import torch

from zipserve.workers.sampler import to_device


def tokenize_bad_words(tokenizer, words: list[str]) -> list[list[int]]:
    """Distinct token sequences of each word, as written and after a space."""
    if tokenizer is None:
        raise ValueError("bad_words needs a model folder with a tokenizer")
    out: list[list[int]] = []
    for w in words:
        for text in (w, " " + w.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in out:
                out.append(ids)
    return out


def needs_known_tokens(seq) -> bool:
    """Whether the request bans a sequence longer than one token (it reads its last output tokens)."""
    return any(len(ids) > 1 for ids in seq.bad_word_ids)


def banned(seq) -> list[int]:
    """Token ids the request may not sample next (its output so far known on the host)."""
    out = seq.output_token_ids
    ban = []
    for ids in seq.bad_word_ids:
        k = len(ids) - 1
        if k == 0 or (len(out) >= k and out[len(out) - k:] == ids[:-1]):
            ban.append(ids[-1])
    return ban


def apply_bad_words(logits: torch.Tensor, seqs) -> torch.Tensor:
    """The logits with each row's banned tokens at -inf (a new tensor, as the runner's logits are read-only)."""
    rows, cols = [], []
    for i, s in enumerate(seqs):
        if s.bad_word_ids:
            ban = banned(s)
            rows += [i] * len(ban)
            cols += ban
    if rows:
        dev = logits.device
        logits = logits.index_put((to_device(rows, torch.long, dev), to_device(cols, torch.long, dev)),
                                  torch.tensor(float("-inf"), device=dev))
    return logits
