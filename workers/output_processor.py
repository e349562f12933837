"""Output processing: a request's new tokens become its text, and the RequestOutput the engine hands back.

The engine decides when a request ends by its tokens (EOS, stop token ids, length, grammar) and retires it;
everything about text is here: the text of each new token, whether a stop string ended the request, the text
held back until its end, and the output that reports it.

Text streams without ever splitting a character: text ending in an incomplete UTF-8 sequence (a character
split across tokens) is held back until the token that completes it, or the request's end. With stop strings,
the last len(longest) - 1 characters are held back too (a stop string may begin there, and text sent is never
taken back), so the streamed pieces always add up to the final text. A fast tokenizer
whose decode is the text (no clean-up of spaces) is decoded by `tokenizers`' DecodeStream, in Rust; any other
tokenizer by decoding windows of ids in Python (WindowDetokenizer).
"""

from __future__ import annotations

from collections.abc import Callable

from tokenizers.decoders import DecodeStream

from zipserve.workers.outputs import RequestOutput, SpanView
from zipserve.workers.sequence import Sequence
from zipserve.workers.tokenizer import fast_backend, text_decoder

PROMPT_CONTEXT_TOKENS = 6  # prompt tokens decoded with the first output token, so it keeps its leading space


class WindowDetokenizer:
    """A request's text, token by token: the new text is that of ids[prefix_offset:] past that of
    ids[prefix_offset:read_offset]; both offsets move on when text comes out. Two decodes per token."""

    __slots__ = ("decode", "prefix_offset", "read_offset", "text")

    def __init__(self, decode: Callable[[list[int]], str], num_prompt_tokens: int):
        self.decode = decode
        self.read_offset = num_prompt_tokens  # the text starts after the prompt
        self.prefix_offset = max(0, num_prompt_tokens - PROMPT_CONTEXT_TOKENS)
        self.text = ""

    def step(self, ids: list[int]) -> str:
        """The text that the tokens appended to `ids` since the last call add (maybe "")."""
        return self._decode_window(ids, final=False)

    def flush(self, ids: list[int]) -> str:
        """The held-back text, at the request's end."""
        return self._decode_window(ids, final=True)

    def _decode_window(self, ids: list[int], final: bool) -> str:
        if self.read_offset == len(ids):
            return ""
        prefix = self.decode(ids[self.prefix_offset : self.read_offset])
        full = self.decode(ids[self.prefix_offset :])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            return self._emit(full[len(prefix) :], len(ids))
        return ""

    def _emit(self, new_text: str, num_tokens: int) -> str:
        self.prefix_offset, self.read_offset = self.read_offset, num_tokens
        self.text += new_text
        return new_text


class StreamDetokenizer(WindowDetokenizer):
    """DecodeStream: one decode per token (plus one per piece of text out), in Rust, with no list slicing.

    The window decoder's offsets are kept as it would have them: DecodeStream has no end-of-request flush, so
    `flush` decodes the held-back window as the window decoder does; and a stream that fails (a decoder whose
    text for a window does not begin with its text for the window's start) hands over to the window decoder
    mid-request without a seam."""

    __slots__ = ("backend", "stream", "skip_chars")

    def __init__(self, backend, decode: Callable[[list[int]], str], token_ids: list[int], num_prompt_tokens: int):
        super().__init__(decode, num_prompt_tokens)
        self.backend = backend
        context = token_ids[self.prefix_offset : num_prompt_tokens]
        self.stream = DecodeStream(context, skip_special_tokens=True)
        # The stream takes its context's text as the text already out only if it ends in a whole character. A
        # prompt of ids may end inside one: then the stream's first text begins with the context's, which the
        # window decoder never emits; skip that many characters.
        context_text = decode(context)
        self.skip_chars = len(context_text) if context_text.endswith("\ufffd") else 0

    def step(self, ids: list[int]) -> str:
        """The text of the token just appended to `ids` (call once per token)."""
        if self.stream is None:
            return self._decode_window(ids, final=False)
        try:
            new_text = self.stream.step(self.backend, ids[-1])
        except Exception:  # the stream's InvalidPrefix: decode windows from here on
            self.stream = None
            return self._decode_window(ids, final=False)
        if new_text is None:
            return ""
        if self.skip_chars:
            skip = min(self.skip_chars, len(new_text))
            self.skip_chars -= skip
            new_text = new_text[skip:]
            if not new_text:
                return ""
        return self._emit(new_text, len(ids))


class NoText:
    """A request of a model folder with no tokenizer (token-id prompts only): no text."""

    __slots__ = ()
    text = ""

    def step(self, ids: list[int]) -> str:
        return ""

    flush = step


class OutputProcessor:
    """Per request: its detokenizer, from add_request until the output that reports its end (or discard)."""

    def __init__(self, tokenizer):
        self.backend = fast_backend(tokenizer) if tokenizer is not None else None
        self.decode = text_decoder(tokenizer) if tokenizer is not None else None
        self.texts: dict[str, WindowDetokenizer | NoText] = {}
        self.sent: dict[str, int] = {}  # characters of its text each request has streamed

    def add_request(self, seq: Sequence) -> None:
        """Start the request's text after its prompt. Output tokens already in seq.token_ids (a resumed request's)
        are replayed token by token, so their text is exactly what was first emitted and what comes next
        continues it."""
        n_prompt = seq.num_prompt_tokens
        if self.decode is None:
            detok = NoText()
        elif self.backend is not None:
            detok = StreamDetokenizer(self.backend, self.decode, seq.token_ids, n_prompt)
        else:
            detok = WindowDetokenizer(self.decode, n_prompt)
        ids = seq.token_ids[:n_prompt]
        for token in seq.token_ids[n_prompt:]:
            ids.append(token)
            detok.step(ids)
        self.texts[seq.request_id] = detok
        self.sent[seq.request_id] = self._streamable(seq, detok.text)  # (what the first worker had streamed)

    def new_text(self, seq: Sequence) -> str:
        """The text the token just appended to the request adds (maybe "": held back, or a special token)."""
        return self.texts[seq.request_id].step(seq.token_ids)

    def check_stop_strings(self, seq: Sequence, new_text: str) -> str:
        """End `seq` at the earliest stop string that the new text completes; returns the new text kept (up to
        the stop string, or through it with include_stop_str_in_output)."""
        detok = self.texts[seq.request_id]
        text, stops = detok.text, seq.params.stop
        longest = max(len(s) for s in stops)
        window_start = max(0, len(text) - len(new_text) - longest + 1)
        best = None
        for s in stops:
            i = text.find(s, window_start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return new_text
        i, s = best
        cut = i + len(s) if seq.params.include_stop_str_in_output else i
        old_len = len(text) - len(new_text)
        detok.text = text[:cut]
        seq.finish_reason, seq.stop_reason = "stop", s
        return detok.text[old_len:]

    def flush(self, seq: Sequence) -> str:
        """At the request's end: the text held back (an incomplete character), unless a stop string ended it."""
        if isinstance(seq.stop_reason, str):  # (a stop string, or an error: its text stays where it was cut)
            return ""
        return self.texts[seq.request_id].flush(seq.token_ids)

    def output(self, seq: Sequence, new_tokens: list[int]) -> RequestOutput:
        """The request's output for this step, with the text that may stream now; the one reporting its end is
        its last (its detokenizer goes)."""
        n_prompt, rid = seq.num_prompt_tokens, seq.request_id
        done = seq.finish_reason is not None  # (its pages may still wait for a compaction to land)
        detok = self.texts.pop(rid, None) if done else self.texts[rid]
        text = detok.text if detok is not None else ""
        sent = self.sent.pop(rid, 0) if done else self.sent[rid]
        upto = max(sent, self._streamable(seq, text))
        if not done:
            self.sent[rid] = upto
        # final outputs own their lists; intermediate ones get O(1) views
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.token_ids[:n_prompt] if done else SpanView(seq.token_ids, 0, n_prompt),
            token_ids=seq.output_token_ids if done else SpanView(seq.token_ids, n_prompt),
            text=text,
            finished=done,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            new_token_ids=new_tokens,
            new_text=text[sent:upto],
            num_cached_tokens=seq.num_cached_prompt_tokens,
            logprobs=None if seq.params.logprobs is None else list(seq.logprobs) if done else SpanView(seq.logprobs, 0),
            prompt_logprobs=self._take_prompt_logprobs(seq) if new_tokens else None,
        )

    def discard(self, request_id: str) -> None:
        """Forget an aborted request (it gets no further output)."""
        self.texts.pop(request_id, None)
        self.sent.pop(request_id, None)

    @staticmethod
    def _streamable(seq: Sequence, text: str) -> int:
        """How much of the text may have streamed by now: all of it at the end or without stop strings, else
        all but the last len(longest stop) - 1 characters."""
        if seq.finish_reason is not None or not seq.params.stop:
            return len(text)
        return max(0, len(text) - max(map(len, seq.params.stop)) + 1)

    @staticmethod
    def _take_prompt_logprobs(seq: Sequence) -> list | None:
        """The prompt's logprobs, once: on the output with the request's first token."""
        if seq.params.prompt_logprobs is None or seq.prompt_logprobs_sent:
            return None
        seq.prompt_logprobs_sent = True
        return list(seq.prompt_logprobs)
