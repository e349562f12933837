"""Seeded request traces for the routing simulator (scheduler/simulate.py).

Token ids are random ints in [0, VOCAB); shared prefixes are shared token lists, so page hashes match
exactly where prompts share pages. Each generator draws the requests' content from one random stream and
their arrival times from another, so the same seed gives the same requests at any `rate` (requests/s,
averaged over the trace): the benchmark first sizes the trace, then picks the rate from its capacity.
"""

from __future__ import annotations

import numpy as np

from zipserve.scheduler.simulate import TraceRequest

VOCAB = 50_000


def _tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(0, VOCAB, int(n)).tolist()


def _rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    return np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])


def math_trace(n_problems: int = 40, rate: float = 1.0, seed: int = 0, samples: int = 32, system_tokens: int = 50,
               problem_tokens: tuple[int, int] = (100, 450), output_tokens: tuple[int, int] = (2000, 8000),
               max_tokens: int = 8192) -> list[TraceRequest]:
    """(a) Math reasoning: one short system prompt, problems of 100-450 tokens (prompts 150-500), `samples`
    samples per problem arriving together, outputs uniform in `output_tokens`. Problems arrive as a Poisson
    process at rate / samples."""
    rng, trng = _rngs(seed)
    system = _tokens(rng, system_tokens)
    out, t = [], 0.0
    for p in range(n_problems):
        if p:
            t += trng.exponential(samples / rate)
        prompt = system + _tokens(rng, rng.integers(problem_tokens[0], problem_tokens[1] + 1))
        for _ in range(samples):
            n = int(rng.integers(output_tokens[0], output_tokens[1] + 1))
            out.append(TraceRequest(len(out), t, prompt, n, max(max_tokens, n), kind=f"math/{p}"))
    return out


def chat_trace(n_sessions: int = 500, rate: float = 1.0, seed: int = 0, n_system: int = 4,
               system_tokens: tuple[int, ...] = (600, 1000, 1500, 2000), turns: tuple[int, int] = (1, 8),
               user_tokens: tuple[int, int] = (20, 200), output_tokens: tuple[int, int] = (50, 500),
               max_tokens: int = 1024, think_s: float = 3.0) -> list[TraceRequest]:
    """(b) Chat: `n_system` shared system prompts; multi-turn sessions (turns uniform in `turns`) where each
    turn's prompt = the previous prompt + the previous answer + new user text; a turn is sent an
    exponential think time (mean `think_s`) after the previous answer ends. Sessions start as a Poisson
    process at rate / mean turns."""
    rng, trng = _rngs(seed)
    systems = [_tokens(rng, system_tokens[i % len(system_tokens)]) for i in range(n_system)]
    plans = [int(rng.integers(turns[0], turns[1] + 1)) for _ in range(n_sessions)]
    session_rate = rate / (sum(plans) / len(plans))
    out, t = [], 0.0
    for s, n_turns in enumerate(plans):
        if s:
            t += trng.exponential(1 / session_rate)
        ctx = list(systems[int(rng.integers(n_system))])
        prev = None
        for k in range(n_turns):
            prompt = ctx + _tokens(rng, rng.integers(user_tokens[0], user_tokens[1] + 1))
            n = int(rng.integers(output_tokens[0], output_tokens[1] + 1))
            answer = _tokens(rng, n)
            think = float(trng.exponential(think_s)) if k else 0.0
            out.append(TraceRequest(len(out), t, prompt, n, max(max_tokens, n), answer=answer, after=prev,
                                    think_s=think, kind=f"chat/{s}"))
            prev = len(out) - 1
            ctx = prompt + answer
    return out


def skewed_trace(n: int = 3000, rate: float = 1.0, seed: int = 0, shared_fraction: float = 0.9,
                 prefix_tokens: int = 3072, suffix_tokens: tuple[int, int] = (50, 300),
                 other_tokens: tuple[int, int] = (200, 2000), output_tokens: tuple[int, int] = (100, 800),
                 max_tokens: int = 1024) -> list[TraceRequest]:
    """(c) Skewed: `shared_fraction` of the requests share one long prefix (+ a unique suffix); the rest are
    unique prompts. Poisson arrivals."""
    rng, trng = _rngs(seed)
    prefix = _tokens(rng, prefix_tokens)
    out, t = [], 0.0
    for i in range(n):
        if i:
            t += trng.exponential(1 / rate)
        if rng.random() < shared_fraction:
            prompt, kind = prefix + _tokens(rng, rng.integers(suffix_tokens[0], suffix_tokens[1] + 1)), "shared"
        else:
            prompt, kind = _tokens(rng, rng.integers(other_tokens[0], other_tokens[1] + 1)), "unique"
        m = int(rng.integers(output_tokens[0], output_tokens[1] + 1))
        out.append(TraceRequest(i, t, prompt, m, max(max_tokens, m), kind=kind))
    return out


def bursty_trace(n: int = 3000, rate: float = 1.0, seed: int = 0, on_s: float = 5.0, off_s: float = 10.0,
                 n_system: int = 8, system_tokens: tuple[int, int] = (200, 1500),
                 user_tokens: tuple[int, int] = (50, 500),
                 output_tokens: tuple[int, int] = (100, 1000), max_tokens: int = 1024) -> list[TraceRequest]:
    """(d) Bursts: on/off arrivals (Poisson at rate x (on + off) / on during `on_s`, nothing for `off_s`);
    each request = one of `n_system` shared system prompts + unique user text."""
    rng, trng = _rngs(seed)
    systems = [_tokens(rng, rng.integers(system_tokens[0], system_tokens[1] + 1)) for _ in range(n_system)]
    on_rate = rate * (on_s + off_s) / on_s
    out, t = [], 0.0
    for i in range(n):
        if i:
            t += trng.exponential(1 / on_rate)
            if t % (on_s + off_s) >= on_s:  # fell into an off period: the time left in it is skipped
                t += (on_s + off_s) - t % (on_s + off_s)
        prompt = systems[int(rng.integers(n_system))] + _tokens(rng, rng.integers(user_tokens[0], user_tokens[1] + 1))
        m = int(rng.integers(output_tokens[0], output_tokens[1] + 1))
        out.append(TraceRequest(i, t, prompt, m, max(max_tokens, m), kind="burst"))
    return out


TRACES = {"math": math_trace, "chat": chat_trace, "skewed": skewed_trace, "bursty": bursty_trace}
