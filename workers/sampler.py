"""Token sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds, top-n logprobs.

Logprobs are those of the model's raw distribution (before temperature and truncation), as in the
OpenAI API. Random rows are drawn on the device by inverse CDF from uniform numbers (DRAWS + 1 a row,
kernels/sampling.py) taken from the request's own CPU generator (seeded requests) or the engine's, so a
seeded run repeats exactly whatever else shares its batches, and the whole batch costs one host-to-device
copy of the uniforms and one device-to-host copy of the tokens (a per-row draw on the CPU would copy every row's distribution to
the host: hundreds of milliseconds per step at a batch of 256).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zipserve.kernels.sampling import DRAWS, inverse_cdf, sample_top_p_ref, top_p_threshold_ref
from zipserve.workers.sampling_params import SamplingParams
from zipserve.workers.transfer import to_device


def truncate_logits(logits: torch.Tensor, params: list[SamplingParams], top_p_threshold=top_p_threshold_ref
                    ) -> torch.Tensor:
    """Apply temperature, top-k, top-p and min-p to rows of fp32 logits; masked entries get -inf. Each cut
    keeps the tokens at or above a value per row (tokens tied with the last one kept are all kept): top-k's
    by torch.topk, top-p's by `top_p_threshold` (kernels/sampling.py; an engine passes its backend's)."""
    device = logits.device
    temp = to_device([p.temperature for p in params], torch.float32, device).unsqueeze(1)
    logits = logits / temp
    top_k = [p.top_k if 0 < p.top_k < logits.shape[-1] else 0 for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    if any(top_k):
        best = logits.topk(max(top_k), dim=-1).values  # [rows, max k], descending
        k = to_device(top_k, torch.long, device).unsqueeze(1)
        kth = best.gather(1, (k - 1).clamp(min=0))
        logits = logits.masked_fill((logits < kth) & (k > 0), float("-inf"))
    if any(p < 1 for p in top_p):
        threshold = top_p_threshold(logits, to_device(top_p, torch.float32, device))
        logits = logits.masked_fill(logits < threshold.unsqueeze(1), float("-inf"))
    if any(m > 0 for m in min_p):
        probs = logits.softmax(-1)
        floor = to_device(min_p, torch.float32, device).unsqueeze(1) * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


class SamplingError(RuntimeError):
    """Rows whose sampling distribution is not a distribution (NaN / inf / all zero)."""

    def __init__(self, rows: list[int]):
        super().__init__(f"invalid sampling distribution in batch rows {rows}")
        self.rows = rows


@dataclass(eq=False)
class LogprobRows:
    """A batch's logprobs for the rows that asked: the sampled token's and the top-n alternatives' (n the
    largest any row asked), computed on the device in a few batched ops and copied back with the tokens,
    so that a step with logprobs keeps async scheduling's overlap."""

    rows: list[int]  # batch rows that asked, ascending
    counts: list[int]  # top-n each of them asked
    chosen: torch.Tensor  # [k] fp32
    values: torch.Tensor  # [k, n] fp32, descending
    ids: torch.Tensor  # [k, n] int64

    def copy_to_host(self) -> "LogprobRows":
        """Start the copies back (pinned, not waited for on CUDA); the caller's event covers them."""
        if self.chosen.device.type != "cuda":
            return self
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (self.chosen, self.values, self.ids)]
        for h, t in zip(host, (self.chosen, self.values, self.ids)):
            h.copy_(t, non_blocking=True)
        return LogprobRows(self.rows, self.counts, *host)

    def by_row(self, tokens: list[int]) -> dict[int, dict[int, float]]:
        """{batch row: {sampled token: logprob, then the row's top-n others}} (waits for the values)."""
        chosen, values, ids = self.chosen.tolist(), self.values.tolist(), self.ids.tolist()
        out = {}
        for j, (row, n) in enumerate(zip(self.rows, self.counts)):
            d = {tokens[row]: chosen[j]}
            for v, i in zip(values[j][:n], ids[j][:n]):
                d.setdefault(i, v)
            out[row] = d
        return out


def sample_on_device(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                     default_generator: torch.Generator | None = None, adjust=None, top_p_threshold=top_p_threshold_ref,
                     sample_top_p=sample_top_p_ref) -> tuple[torch.Tensor, torch.Tensor | None, LogprobRows | None]:
    """(tokens [rows] int64, bad rows [rows] bool or None when all greedy, logprobs or None), all on the
    logits' device and queued without waiting for it: the caller decides when to copy them back.
    `adjust` (penalties, biases: workers/penalties.py) changes the fp32 logits after the raw logprobs.
    Random rows with temperature and top-p alone (the serving case) are drawn by `sample_top_p` straight from
    the logits; rows with top-k or min-p are truncated first (truncate_logits), then drawn by inverse CDF."""
    logits = logits.float()
    asked = [i for i, p in enumerate(params) if p.logprobs is not None]
    raw = None
    if asked:  # the raw distribution, before penalties and temperature, for the asking rows alone
        asked_idx = to_device(asked, torch.long, logits.device)
        raw = logits[asked_idx].log_softmax(-1)
    if adjust is not None:
        logits = adjust(logits)
    rand = [i for i, p in enumerate(params) if not p.greedy]
    tokens = logits.argmax(-1) if len(rand) < len(params) else None
    bad = None
    if rand:
        every = len(rand) == len(params)
        idx = None if every else to_device(rand, torch.long, logits.device)
        rows = logits if every else logits[idx]
        sub = [params[i] for i in rand]
        u = uniforms([generators[i] for i in rand], default_generator)
        if all(0 >= p.top_k or p.top_k >= logits.shape[-1] for p in sub) and not any(p.min_p > 0 for p in sub):
            drawn, bad_rows = sample_top_p(rows, to_device([p.temperature for p in sub], torch.float32, logits.device),
                                           to_device([p.top_p for p in sub], torch.float32, logits.device),
                                           to_device(u, torch.float32, logits.device))
        else:
            probs = truncate_logits(rows, sub, top_p_threshold).softmax(-1)
            bad_rows = ~(torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0))
            drawn = inverse_cdf(probs.nan_to_num(0.0), to_device(u[:, 0], torch.float32, logits.device))
        if every:
            tokens, bad = drawn, bad_rows
        else:
            tokens[idx] = drawn
            bad = torch.zeros(len(params), dtype=torch.bool, device=logits.device)
            bad[idx] = bad_rows
    if raw is None:
        return tokens, bad, None
    counts = [params[i].logprobs for i in asked]
    chosen = raw.gather(1, tokens[asked_idx].unsqueeze(1)).squeeze(1)
    values, ids = raw.topk(max(counts), dim=-1)
    return tokens, bad, LogprobRows(asked, counts, chosen, values, ids)


def uniforms(generators: list[torch.Generator | None], default_generator: torch.Generator | None) -> torch.Tensor:
    """[rows, DRAWS + 1] uniforms on the host: a seeded request's from its own generator (so that a seeded run
    repeats exactly whatever else shares its batches), the rest in one draw from the engine's."""
    u = torch.empty(len(generators), DRAWS + 1)
    unseeded = []
    for j, g in enumerate(generators):
        if g is None:
            unseeded.append(j)
        else:
            u[j] = torch.rand(DRAWS + 1, generator=g)
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), DRAWS + 1, generator=default_generator)
    return u


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           default_generator: torch.Generator | None = None, adjust=None, top_p_threshold=top_p_threshold_ref,
           sample_top_p=sample_top_p_ref) -> tuple[list[int], dict[int, dict[int, float]]]:
    """The sampled token per row, and {row: {token: logprob}} for the rows that asked for logprobs (the
    sampled token first, then the row's top-n), waiting for the device."""
    tokens, bad, logprobs = sample_on_device(logits, params, generators, default_generator, adjust, top_p_threshold,
                                             sample_top_p)
    out = (tokens if bad is None else torch.cat([tokens, bad.long()])).tolist()  # one copy for tokens and checks
    if bad is not None:
        check_rows(out[len(tokens):])
    out = out[: len(tokens)]
    return out, ({} if logprobs is None else logprobs.by_row(out))


def check_rows(bad: list[int]) -> None:
    """Raise SamplingError for rows flagged bad (never with validated params; a model emitting NaN would)."""
    if any(bad):
        raise SamplingError([r for r, b in enumerate(bad) if b])
