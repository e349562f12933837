"""Logit penalties and biases, batched on the device: presence / frequency (OpenAI: over generated tokens),
repetition (vLLM / transformers: over prompt and generated tokens), logit_bias, min_tokens, and vLLM's
allowed_token_ids (every other token masked).

Each request that uses presence, frequency or repetition penalties holds a row of a device table of token
counts (its generated tokens) and a row of prompt-token flags; the sampled tokens are added on the device
after each step, so async scheduling (tokens not yet on the host) needs nothing extra. Rows are taken at the
request's first penalized step and given back when it ends. A batch in which no request uses any of these
pays nothing: `active` is false and the sampler never calls in.
"""

from __future__ import annotations

import torch

from zipserve.workers.transfer import to_device
from zipserve.workers.sampling_params import SamplingParams


def uses_counts(p: SamplingParams) -> bool:
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)


def is_penalized(p: SamplingParams) -> bool:
    return uses_counts(p) or bool(p.logit_bias) or p.min_tokens > 0 or p.allowed_token_ids is not None


class PenaltyState:
    def __init__(self, device: torch.device, stop_ids: set[int]):
        self.device = device
        self.stop_ids = sorted(stop_ids)  # what min_tokens holds back (with each request's stop_token_ids)
        self.counts: torch.Tensor | None = None  # [rows, V] int32, made at the first penalized request
        self.in_prompt: torch.Tensor | None = None  # [rows, V] bool
        self.row_of: dict[str, int] = {}
        self.free: list[int] = []

    # ---- rows -----------------------------------------------------------------------------------
    def _row(self, seq, width: int) -> int:
        """The request's row, made at its first penalized step from the tokens the host knows (the step's
        input is the last of them: a pending token is counted by `record` when it is sampled)."""
        row = self.row_of.get(seq.request_id)
        if row is not None:
            return row
        if not self.free:  # grow: twice the rows (a preempted request keeps its row while it waits)
            n = 0 if self.counts is None else self.counts.shape[0]
            grow = max(8, n)
            self.counts = torch.cat([t for t in (self.counts,) if t is not None] +
                                    [torch.zeros(grow, width, dtype=torch.int32, device=self.device)])
            self.in_prompt = torch.cat([t for t in (self.in_prompt,) if t is not None] +
                                       [torch.zeros(grow, width, dtype=torch.bool, device=self.device)])
            self.free = list(range(n + grow - 1, n - 1, -1))
        row = self.row_of[seq.request_id] = self.free.pop()
        prompt = to_device(seq.token_ids[: seq.num_prompt_tokens], torch.long, self.device)
        out = torch.tensor(seq.token_ids[seq.num_prompt_tokens :], dtype=torch.long)  # known so far (resumed, say)
        self.in_prompt[row].zero_()
        self.in_prompt[row, prompt] = True
        self.counts[row] = to_device(torch.bincount(out, minlength=width).int(), torch.int32, self.device)
        return row

    def release(self, request_id: str) -> None:
        row = self.row_of.pop(request_id, None)
        if row is not None:
            self.free.append(row)

    # ---- per step -------------------------------------------------------------------------------
    @staticmethod
    def active(seqs) -> bool:
        return any(is_penalized(s.params) for s in seqs)

    def apply(self, logits: torch.Tensor, seqs) -> torch.Tensor:
        """Rows of fp32 logits with each request's penalties, biases and min_tokens applied (a new tensor)."""
        logits = logits.clone()
        dev = logits.device
        counted = [i for i, s in enumerate(seqs) if uses_counts(s.params)]
        if counted:
            rows = to_device([self._row(seqs[i], logits.shape[-1]) for i in counted], torch.long, dev)
            idx = to_device(counted, torch.long, dev)
            ps = [seqs[i].params for i in counted]
            counts, in_prompt = self.counts[rows].float(), self.in_prompt[rows]
            x = logits[idx]
            rep = to_device([p.repetition_penalty for p in ps], torch.float32, dev).unsqueeze(1)
            seen = in_prompt | (counts > 0)
            x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
            freq = to_device([p.frequency_penalty for p in ps], torch.float32, dev).unsqueeze(1)
            pres = to_device([p.presence_penalty for p in ps], torch.float32, dev).unsqueeze(1)
            logits[idx] = x - freq * counts - pres * (counts > 0).float()
        bias_rows, bias_ids, bias_vals = [], [], []
        for i, s in enumerate(seqs):
            for tok, v in (s.params.logit_bias or {}).items():
                bias_rows.append(i)
                bias_ids.append(tok)
                bias_vals.append(v)
        if bias_rows:
            logits.index_put_((to_device(bias_rows, torch.long, dev), to_device(bias_ids, torch.long, dev)),
                              to_device(bias_vals, torch.float32, dev), accumulate=True)
        held_rows, held_ids = [], []
        for i, s in enumerate(seqs):
            if s.num_output_tokens < s.params.min_tokens:
                stops = set(s.params.stop_token_ids) | (set() if s.params.ignore_eos else set(self.stop_ids))
                held_rows += [i] * len(stops)
                held_ids += sorted(stops)
        if held_rows:
            logits[to_device(held_rows, torch.long, dev), to_device(held_ids, torch.long, dev)] = float("-inf")
        keep_rows, keep_ids = [], []
        for i, s in enumerate(seqs):
            if s.params.allowed_token_ids is not None:
                keep_rows += [i] * len(s.params.allowed_token_ids)
                keep_ids += s.params.allowed_token_ids
        if keep_rows:
            restricted = to_device(sorted({r for r in keep_rows}), torch.long, dev)
            allowed = torch.zeros_like(logits, dtype=torch.bool)
            allowed[to_device(keep_rows, torch.long, dev), to_device(keep_ids, torch.long, dev)] = True
            allowed[~torch.isin(torch.arange(len(seqs), device=dev), restricted)] = True
            logits = logits.masked_fill(~allowed, float("-inf"))
        return logits

    def record(self, seqs, tokens: torch.Tensor) -> None:
        """Count this step's sampled tokens (`tokens` [len(seqs)] on the device) for the requests that count."""
        if not self.row_of:  # no request holds a row: nothing to count (every step without penalties)
            return
        counted = [i for i, s in enumerate(seqs) if uses_counts(s.params) and s.request_id in self.row_of]
        if not counted or not len(tokens):
            return
        dev = self.counts.device
        rows = to_device([self.row_of[seqs[i].request_id] for i in counted], torch.long, dev)
        toks = to_device(tokens, torch.long, dev)[to_device(counted, torch.long, dev)]
        self.counts.index_put_((rows, toks), torch.ones_like(toks, dtype=torch.int32), accumulate=True)
