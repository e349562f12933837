"""Reasoning output: split a model's `<think> ... </think>` from its answer, as text streams in.

One parser per chat choice. Families differ in where thinking starts:
  qwen3        the model writes `<think>` itself; output that does not open with it is all answer
               (Qwen3 with `enable_thinking: false`, whose template closes an empty block in the prompt)
  deepseek_r1  the chat template opens `<think>` in the prompt, so output is reasoning until `</think>`
               (a `<think>` the model writes anyway is dropped); with no `</think>`, all of it is reasoning
The answer after `</think>` is kept as written, leading newlines included (as vLLM's parsers do).
Tags split across chunks are held back until they can be told apart from text.
"""

from __future__ import annotations

START, END = "<think>", "</think>"
PARSERS = ("qwen3", "deepseek_r1")


def held_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (it may become the tag)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class ReasoningParser:
    def __init__(self, family: str):
        if family not in PARSERS:
            raise ValueError(f"reasoning_parser must be one of {', '.join(PARSERS)}, got {family!r}")
        self.family = family
        self.state = "opening"  # is the output opening with <think>?
        self.buf = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, content) newly decided by this text; `final` flushes what was held back."""
        self.buf += text
        reasoning = content = ""
        while True:
            if self.state == "opening":
                stripped = self.buf.lstrip()
                if stripped.startswith(START):
                    self.buf, self.state = stripped[len(START):], "reasoning"
                elif START.startswith(stripped) and not final:
                    return reasoning, content  # it may still be the opening tag
                else:  # no opening tag: an answer (qwen3), or reasoning opened by the template (deepseek_r1)
                    self.state = "reasoning" if self.family == "deepseek_r1" else "content"
            elif self.state == "reasoning":
                i = self.buf.find(END)
                if i >= 0:  # the answer follows as written (vLLM's parsers keep its leading newlines too)
                    reasoning += self.buf[:i]
                    self.buf, self.state = self.buf[i + len(END):], "content"
                    continue
                keep = 0 if final else held_suffix(self.buf, END)
                reasoning += self.buf[: len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep:]
                return reasoning, content
            else:  # content
                content += self.buf
                self.buf = ""
                return reasoning, content


def split_reasoning(family: str, text: str) -> tuple[str | None, str | None]:
    """(reasoning_content, content) of a whole output; None where a part is absent."""
    reasoning, content = ReasoningParser(family).feed(text, final=True)
    return reasoning or None, content if content or not reasoning else None
