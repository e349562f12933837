"""Structured output: grammars that constrain what a request may sample (xgrammar).

A request's `SamplingParams.structured` names one constraint: `{"json": schema}`, `{"json_object": True}`,
`{"regex": pattern}`, `{"choice": [strings]}`, `{"grammar": EBNF}` or `{"structural_tag": JSON}` (what
the API layer builds for tools: cluster/tool_calls.py), with `"disable_any_whitespace": True` for JSON
without free whitespace (vLLM's option). Free whitespace in JSON is capped at MAX_WHITESPACE characters in
a row: a model that falls into emitting whitespace (weak models do) cannot fill its whole budget with it. `validate_structured` checks it without a
tokenizer, so a bad schema is a 400 before any work. `GrammarBook` (one per engine) compiles each spec on
a thread (xgrammar caches compiled grammars by spec), keeps one matcher per request, fills the batch's
token bitmask on the host while the GPU runs the forward, and advances each matcher by the tokens the
engine appends. The mask is applied to the logits on the device, after penalties, before sampling.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import Future, ThreadPoolExecutor

import torch

KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
OPTIONS = ("disable_any_whitespace",)
MAX_WHITESPACE = 20  # pretty-printed JSON nests 9 deep within it
ANY_OBJECT = '{"type": "object"}'  # JSON mode: any object (compiled loosely, so any properties)


def _xgr():
    try:
        import xgrammar
    except ImportError as e:  # a dependency of the package: only a broken install lacks it
        raise RuntimeError("structured output needs the xgrammar package (pip install xgrammar)") from e
    return xgrammar


def _choice_regex(choices: list[str]) -> str:
    import re

    return "(" + "|".join(re.escape(c) for c in choices) + ")"


def _kind(spec: dict) -> tuple[str, object]:
    kind = next(k for k in spec if k in KINDS)
    return kind, spec[kind]


def _json_options(spec: dict, kind: str) -> dict:
    loose = kind == "json_object"
    if spec.get("disable_any_whitespace"):
        return {"any_whitespace": False, "strict_mode": not loose}
    return {"any_whitespace": True, "max_whitespace_cnt": MAX_WHITESPACE, "strict_mode": not loose}


def _schema_text(kind: str, value) -> str:
    if kind == "json_object":
        return ANY_OBJECT
    return value if isinstance(value, str) else json.dumps(value)


def grammar_of(spec: dict):
    """The spec as an xgrammar Grammar (tokenizer-free); raises ValueError saying what is wrong."""
    xgr = _xgr()
    kind, value = _kind(spec)
    try:
        if kind in ("json", "json_object"):
            return xgr.Grammar.from_json_schema(_schema_text(kind, value), **_json_options(spec, kind))
        if kind == "regex":
            return xgr.Grammar.from_regex(value)
        if kind == "choice":
            return xgr.Grammar.from_regex(_choice_regex(value))
        if kind == "grammar":
            return xgr.Grammar.from_ebnf(value)
        return xgr.Grammar.from_structural_tag(value if isinstance(value, str) else json.dumps(value))
    except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's message, without its source location
        why = re.sub(r"^\[[0-9:.]+\] \S+:\d+: ", "", str(e).strip().splitlines()[-1])
        raise ValueError(f"invalid {kind}: {why}") from None


def validate_structured(spec) -> None:
    """Raise ValueError unless `spec` is one known constraint that parses."""
    if spec is None:
        return
    if (not isinstance(spec, dict) or sum(k in KINDS for k in spec) != 1
            or any(k not in KINDS and k not in OPTIONS for k in spec)):
        raise ValueError(f"structured must hold exactly one of {', '.join(KINDS)} (and optionally "
                         f"{', '.join(OPTIONS)})")
    if not isinstance(spec.get("disable_any_whitespace", False), bool):
        raise ValueError("disable_any_whitespace must be true or false")
    kind, value = _kind(spec)
    if kind == "json_object" and value is not True:
        raise ValueError("json_object must be true")
    if kind in ("regex", "grammar") and not (isinstance(value, str) and value):
        raise ValueError(f"{kind} must be a non-empty string")
    if kind == "choice" and not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
        raise ValueError("choice must be a non-empty list of non-empty strings")
    if kind in ("json", "structural_tag") and not isinstance(value, (str, dict)):
        raise ValueError(f"{kind} must be a JSON object or its text")
    grammar_of(spec)


class GrammarBook:
    """Owns every constrained request's compiled grammar and matcher (keyed by request id)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], threads: int = 2):
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, sorted(stop_token_ids)
        self._compiler = None
        self._pool: ThreadPoolExecutor | None = None
        self._threads = threads
        self.compiling: dict[str, tuple[object, Future]] = {}  # request id -> (seq, future of its grammar)
        self.matchers: dict[str, object] = {}

    def _compile(self, spec: dict):
        xgr = _xgr()
        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=self._threads)
        return self._compiler.compile_grammar(grammar_of(spec))  # (the one spec -> grammar rule)

    # ---- lifecycle -----------------------------------------------------------------------
    def submit(self, seq) -> None:
        """Start compiling `seq`'s grammar; the engine schedules it once `ready` hands it back."""
        if self.tokenizer is None:
            raise ValueError("structured output needs a model folder with a tokenizer")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self.compiling[seq.request_id] = (seq, self._pool.submit(self._compile, seq.params.structured))

    def ready(self, wait_s: float | None = 0.0) -> list[tuple[object, str | None]]:
        """Requests whose grammar has compiled: (seq, None), or (seq, why) when it failed. With `wait_s`,
        waits that long for the oldest one first (an engine with nothing else to do); with None, waits for
        all (tensor-parallel ranks must admit a request at the same step)."""
        if wait_s is None:
            for _, fut in list(self.compiling.values()):
                try:
                    fut.result()
                except Exception:  # noqa: BLE001 -- reported below, with the request
                    pass
        elif wait_s and self.compiling:
            try:
                next(iter(self.compiling.values()))[1].result(timeout=wait_s)
            except Exception:  # noqa: BLE001 -- reported below, with the request
                pass
        out = []
        for rid, (seq, fut) in list(self.compiling.items()):
            if not fut.done():
                continue
            del self.compiling[rid]
            try:
                matcher = _xgr().GrammarMatcher(fut.result())
            except Exception as e:  # noqa: BLE001 -- the request fails, the engine goes on
                out.append((seq, f"grammar failed to compile: {e}"))
                continue
            for t in seq.output_token_ids:  # a resumed request: its earlier output advances the grammar
                if not matcher.accept_token(t):
                    out.append((seq, "the resumed output does not match the grammar"))
                    break
            else:
                self.matchers[rid] = matcher
                out.append((seq, None))
        return out

    def release(self, request_id: str) -> bool:
        """Drop the request's matcher; True if it was still compiling (never handed to the scheduler)."""
        self.matchers.pop(request_id, None)
        return self.compiling.pop(request_id, None) is not None

    # ---- per step ------------------------------------------------------------------------
    def constrains(self, seqs) -> bool:
        return bool(self.matchers) and any(s.request_id in self.matchers for s in seqs)

    def mask(self, seqs, device: torch.device):
        """The logits change that keeps each constrained row to its grammar's allowed tokens, or None. The
        bitmask is filled now (on the host); the returned function applies it on the logits' device."""
        rows = [i for i, s in enumerate(seqs) if s.request_id in self.matchers]
        if not rows:
            return None
        xgr = _xgr()
        bitmask = xgr.allocate_token_bitmask(len(seqs), self.vocab_size)
        for i in rows:
            self.matchers[seqs[i].request_id].fill_next_token_bitmask(bitmask, i)
        if device.type == "cuda":
            bitmask = bitmask.pin_memory().to(device, non_blocking=True)

        def apply(logits: torch.Tensor) -> torch.Tensor:
            xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, indices=rows)
            return logits

        return apply

    def accept(self, request_id: str, token: int) -> str | None:
        """Advance the request's matcher by an appended token: None, "done" (the grammar is complete) or
        "rejected" (the token breaks the grammar)."""
        matcher = self.matchers.get(request_id)
        if matcher is None:
            return None
        if not matcher.accept_token(token):
            return "rejected"
        return "done" if matcher.is_terminated() else None
