"""Tool calls: the grammar that constrains them and the parser that turns them into OpenAI `tool_calls`.

The format is Hermes / Qwen's, which Qwen2.5, Qwen3, Hermes and many fine-tunes' chat templates teach:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

With `tools` and tool_choice `auto`, `required` or a named function, the output is constrained by
xgrammar's structural tag for this format: free text where the choice allows it, and every call's
arguments held to its tool's `parameters` schema, so each call parses. `none` leaves the output alone
and unparsed (the tools still reach the chat template, as in vLLM). One parser per chat choice turns
text into content and tool-call deltas as it streams: a call's name is sent once its header is complete,
then its arguments as they come, holding back only what may be the call's closing `}` and tag.
"""

from __future__ import annotations

import json
import re
import uuid

from zipserve.cluster.reasoning import held_suffix

BEGIN, END = "<tool_call>", "</tool_call>"
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def structural_tag(tools: list[dict], tool_choice, parallel_tool_calls: bool, reasoning: bool) -> str:
    """The structural tag (JSON text, workers/grammar.py's `structural_tag` constraint) for the request's
    tools and choice; `reasoning`: a `<think>` block may open the output (a reasoning model)."""
    import xgrammar

    from zipserve.workers.grammar import MAX_WHITESPACE

    tag = xgrammar.get_model_structural_tag("qwen_3", tools=tools, tool_choice=tool_choice,
                                            reasoning="auto" if reasoning else "disabled",
                                            parallel_tool_calls=parallel_tool_calls, max_whitespace_cnt=MAX_WHITESPACE)
    return tag.model_dump_json()


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    """Splits one choice's text into content and tool calls as it streams (see the module's docstring)."""

    def __init__(self):
        self.state = "text"  # text | header | arguments
        self.buf = ""
        self.calls: list[dict] = []  # {"id", "name", "arguments"} of the calls begun so far
        self.closed = 0  # how many of them ended with their closing tag
        self.after_call = False  # whitespace after a call's closing tag is not content

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        """(content, tool-call deltas in OpenAI's streamed shape) newly decided by this text."""
        self.buf += text
        content, deltas = "", []
        while True:
            if self.state == "text":
                if self.after_call:
                    stripped = self.buf.lstrip()
                    if not stripped and not final:
                        return content, deltas
                    self.buf, self.after_call = stripped, False
                i = self.buf.find(BEGIN)
                if i < 0:
                    keep = 0 if final else held_suffix(self.buf, BEGIN)
                    content += self.buf[: len(self.buf) - keep]
                    self.buf = self.buf[len(self.buf) - keep:]
                    return content, deltas
                content += self.buf[:i]
                self.buf, self.state = self.buf[i + len(BEGIN):], "header"
            elif self.state == "header":
                m = _HEADER.match(self.buf)
                if m is None:
                    return content, deltas  # the header is not complete yet
                call = {"id": new_call_id(), "name": json.loads(f'"{m.group(1)}"'), "arguments": ""}
                self.calls.append(call)
                deltas.append({"index": len(self.calls) - 1, "id": call["id"], "type": "function",
                               "function": {"name": call["name"], "arguments": ""}})
                self.buf, self.state = self.buf[m.end():], "arguments"
            else:  # arguments: everything up to the call's own closing brace before </tool_call>
                call = self.calls[-1]
                i = self.buf.find(END)
                if i >= 0:
                    args = self.buf[:i].rstrip()
                    args = args[:-1].rstrip() if args.endswith("}") else args  # the call object's own brace
                    self.buf, self.state = self.buf[i + len(END):], "text"
                    self.closed += 1
                    self.after_call = True
                else:
                    keep = 0 if final else held_suffix(self.buf, END)
                    args = self.buf[: len(self.buf) - keep]
                    if not final:  # hold back what may be the call object's closing brace
                        stripped = args.rstrip()
                        args = stripped[:-1] if stripped.endswith("}") else stripped
                    self.buf = self.buf[len(args):]
                new = args.lstrip() if not call["arguments"] else args  # (the header's regex may not have seen it)
                if new:
                    call["arguments"] += new
                    deltas.append({"index": len(self.calls) - 1, "function": {"arguments": new}})
                if self.state == "arguments":
                    return content, deltas


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content or None, complete tool calls in OpenAI's message shape) of a whole output. A call cut
    short (max_tokens) is not a call: its text stays in the content."""
    p = ToolCallParser()
    content, _ = p.feed(text, final=True)
    calls = p.calls[: p.closed]
    if p.state != "text":  # the unfinished last call's text goes back into the content
        content += text[text.rfind(BEGIN):]
    calls = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
             for c in calls]
    content = content.strip() if calls else content
    return (content or None) if calls else content, calls
