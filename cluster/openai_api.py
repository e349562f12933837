"""OpenAI-compatible request and response schemas (pure: no Ray, no HTTP server).

Requests are validated with pydantic, unknown fields rejected (a misspelled option must not be silently
ignored). OpenAI fields with no effect on a self-hosted server (`store`, `metadata`, `service_tier`,
`prediction`, ...) and vLLM's neutral extras are accepted. Options not implemented (e.g.
`skip_special_tokens: false`) are refused naming the param. Structured output (`response_format`, vLLM's
`structured_outputs`) becomes one engine constraint (workers/grammar.py); tools are shaped here and
turned into a constraint by the ingress (cluster/tool_calls.py). zipserve's own
fields: `top_k`, `min_p`, `ignore_eos`, `stop_token_ids`, `include_stop_str_in_output`, `kv_budget_blocks`
(a per-request KV budget in pages, for engines started with compression), `kv_recall_pages` (pages recalled
per compression for this request, up to the engine's `compression.recall.pages`; 0: none).
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, field_validator, model_validator
from pydantic_core import PydanticCustomError
from typing_extensions import Required, TypedDict  # pydantic needs typing_extensions' TypedDict before 3.12

MAX_N = 16
MAX_TOP_LOGPROBS = 20  # chat (OpenAI's limit); completions take at most 5


def refuse(param: str, message: str):
    """A validation error that names its param (the HTTP layer puts it in the error's `param`)."""
    return PydanticCustomError("refused", message, {"param": param})


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage so far in every chunk (load generators count tokens by it)
    include_obfuscation: bool | None = None  # OpenAI pads chunks against length side channels; none added here


class JSONSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None  # schemas are always enforced here


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one constraint."""
    model_config = ConfigDict(extra="forbid")
    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: dict | str | None = None
    disable_any_whitespace: bool = False  # JSON without free whitespace


def check_structured(spec: dict | None, param: str) -> dict | None:
    """The engine's own check of a constraint (workers/grammar.py), as a refusal naming `param`."""
    from zipserve.workers.grammar import validate_structured

    try:
        validate_structured(spec)
    except ValueError as e:
        raise refuse(param, f"{param}: {e}") from None
    return spec


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    _structured: dict | None = PrivateAttr(None)

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None  # accepted for compatibility; identifies the caller only
    # OpenAI fields with nothing to do on a self-hosted server: accepted, no effect.
    store: bool | None = None  # nothing is stored
    metadata: dict[str, str] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # the prefix cache needs no key
    # vLLM's extras with their default meaning here.
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    add_special_tokens: bool | None = None  # completions: True (BOS where the tokenizer adds one); chat: False
    priority: int = 0
    request_id: str | None = None
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    min_tokens: int = Field(0, ge=0)
    bad_words: list[str] | None = None  # vLLM's: word sequences never generated
    allowed_token_ids: list[int] | None = Field(None, min_length=1)  # vLLM's: sample only among these
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None  # (vLLM takes it on completions too)
    structured_outputs: StructuredOutputs | None = None  # vLLM's
    # zipserve extensions
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    kv_budget_blocks: int | None = Field(None, ge=1)
    kv_recall_pages: int | None = Field(None, ge=0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 8 or any(not s for s in stops):
            raise refuse("stop", "stop must be up to 8 non-empty strings")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        for tok, v in (self.logit_bias or {}).items():
            if not tok.isdigit() or not -100 <= v <= 100:
                raise refuse("logit_bias", "logit_bias must map token ids to values in [-100, 100]")
        if any(not w.strip() for w in self.bad_words or []):
            raise refuse("bad_words", "bad_words must be non-empty strings")
        if not self.skip_special_tokens:
            raise refuse("skip_special_tokens", "skip_special_tokens: false is not supported by this server yet")
        if self.priority:
            raise refuse("priority", "priority scheduling is not supported by this server (use 0)")
        if self.stream_options is not None and not self.stream:
            raise refuse("stream_options", "stream_options is only allowed with stream: true")
        self._structured = self._constraint()
        return self

    def _constraint(self) -> dict | None:
        """response_format or structured_outputs as one engine constraint (None: free text)."""
        rf, so = self.response_format, self.structured_outputs
        if rf is not None and rf.type != "text" and so is not None:
            raise refuse("structured_outputs", "give response_format or structured_outputs, not both")
        if so is not None:
            given = {k: v for k, v in so.model_dump(by_alias=True, exclude={"disable_any_whitespace"}).items()
                     if v is not None}
            if len(given) != 1:
                raise refuse("structured_outputs", "structured_outputs must hold exactly one of json, regex, "
                                                   "choice, grammar, json_object, structural_tag")
            if so.disable_any_whitespace:
                given["disable_any_whitespace"] = True
            return check_structured(given, "structured_outputs")
        if rf is None or rf.type == "text":
            if rf is not None and rf.json_schema is not None:
                raise refuse("response_format", "response_format.json_schema needs type: json_schema")
            return None
        if rf.type == "json_object":
            return check_structured({"json_object": True}, "response_format")
        if rf.json_schema is None:
            raise refuse("response_format", "response_format type json_schema needs a json_schema")
        return check_structured({"json": rf.json_schema.schema_ or {"type": "object"}}, "response_format")

    def sampling_params(self, max_tokens: int) -> dict:
        """SamplingParams fields (workers/sampling_params.py) for the worker."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                "seed": self.seed, "max_tokens": max_tokens, "ignore_eos": self.ignore_eos, "stop": self.stop,
                "stop_token_ids": self.stop_token_ids or [],
                "include_stop_str_in_output": self.include_stop_str_in_output,
                "budget_blocks": self.kv_budget_blocks, "recall_pages": self.kv_recall_pages,
                "logprobs": self.num_logprobs(),
                "presence_penalty": self.presence_penalty or 0.0, "frequency_penalty": self.frequency_penalty or 0.0,
                "repetition_penalty": self.repetition_penalty or 1.0, "min_tokens": self.min_tokens,
                "logit_bias": {int(t): v for t, v in (self.logit_bias or {}).items()},
                "structured": self._structured, "bad_words": self.bad_words or [],
                "allowed_token_ids": self.allowed_token_ids}

    def num_logprobs(self) -> int | None:
        """Top logprobs per generated token for the engine (None: none asked for); each endpoint's own."""
        return None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_only(self):
        if self.best_of not in (None, 1, self.n):
            raise refuse("best_of", "best_of is not supported by this server (use n)")
        if self.suffix:
            raise refuse("suffix", "suffix is not supported by this server")
        if isinstance(self.prompt, list) and not self.prompt:
            raise refuse("prompt", "prompt must not be empty")
        return self

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def sampling_params(self, max_tokens: int) -> dict:
        """With echo, logprobs cover the prompt too (scored by the engine, its prompt not served from cache)."""
        return dict(super().sampling_params(max_tokens), prompt_logprobs=self.logprobs if self.echo else None)

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str


class ToolCall(BaseModel):
    """A tool call in an assistant message of the conversation so far."""
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    refusal: str | None = None  # assistant: a refusal it gave (kept as its text)

    @model_validator(mode="after")
    def _shape(self):
        if self.role == "tool" and not self.tool_call_id:
            raise refuse("messages", "messages: a message with role tool needs the tool_call_id it answers")
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.refusal)):
            raise refuse("messages", f"messages: a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise refuse("messages", "messages: only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def for_template(self) -> dict:
        """The message as chat templates take it (tool-call arguments as objects, as Hugging Face's expect)."""
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


def _json_or_text(s: str):
    import json

    try:
        return json.loads(s)
    except ValueError:
        return s


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None  # arguments always follow the schema here


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class _ChatTemplating(BaseModel):
    """The chat template's options, and what a request with chat messages gives the tokenizer's template
    (chat and /tokenize share them)."""
    model_config = ConfigDict(extra="forbid")
    tools: list[Tool] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None  # to the chat template
    chat_template: str | None = None  # vLLM's extras from here on
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    def template_kwargs(self) -> dict:
        """Keyword arguments for the tokenizer's apply_chat_template (without the messages)."""
        kw = dict(self.chat_template_kwargs or {})
        if self.tools:
            kw.setdefault("tools", [t.model_dump(exclude_none=True) for t in self.tools])
        if self.reasoning_effort is not None:
            kw.setdefault("reasoning_effort", self.reasoning_effort)
        kw.update(add_generation_prompt=self.add_generation_prompt, continue_final_message=self.continue_final_message,
                  tokenize=False)
        if self.chat_template is not None:
            kw["chat_template"] = self.chat_template
        return kw

    def chat(self) -> list[dict]:
        return [m.for_template() for m in self.messages]


class ChatCompletionRequest(_Common, _ChatTemplating):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # OpenAI fields with no effect here (text only; a predicted output only speeds up a server that uses it).
    modalities: list[Literal["text"]] | None = None
    prediction: dict | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    prompt_cache_retention: str | None = None
    # OpenAI features this server does not have: named, refused unless absent.
    audio: dict | None = None
    web_search_options: dict | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    @model_validator(mode="after")
    def _chat_only(self):
        for name in ("audio", "web_search_options", "functions", "function_call"):
            if getattr(self, name) is not None:
                raise refuse(name, f"{name} is not supported by this server")
        if self.top_logprobs and not self.logprobs:
            raise refuse("top_logprobs", "top_logprobs needs logprobs: true")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise refuse("tools", "tool names must be unique")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise refuse("tool_choice", "tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise refuse("tool_choice", f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        if self.tool_mode is not None and self._structured is not None:
            raise refuse("response_format" if self.response_format else "structured_outputs",
                         "a response format cannot be combined with tool calls (tool_choice none allows it)")
        if self.continue_final_message and self.add_generation_prompt:
            raise refuse("continue_final_message", "continue_final_message needs add_generation_prompt: false")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise refuse("continue_final_message", "continue_final_message needs a final assistant message")
        return self

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def tool_mode(self) -> str | None:
        """How tool calls are made: auto, required or named (constrained and parsed), or None (no tools, or
        tool_choice none: output left alone)."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_ChatTemplating):
    """vLLM's /tokenize: a `prompt`, or chat `messages` (with the chat request's template options)."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # prompt: True; messages: False (the template adds them)
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise refuse("prompt", "give either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


# ---- responses -------------------------------------------------------------------------------------
# OpenAI's response schema. Whole bodies (completions, chat, models, errors) are pydantic models, checked
# once per response. Streamed chunks, one per token or merged tokens, are TypedDicts of the same shapes
# serialised by a TypeAdapter (`CHAT_CHUNK`, `COMPLETION_CHUNK`): typed, but never validated per chunk.
# Pieces both share (usage, logprobs, tool calls) are TypedDicts, which models validate as fields.

FinishReason = Literal["stop", "length", "tool_calls"]


def _is_none(v) -> bool:
    return v is None


class PromptTokensDetails(TypedDict):
    cached_tokens: int


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(TypedDict):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None


class CompletionLogprobs(TypedDict):
    """The legacy completions shape: one entry per token in each list (None: nothing predicts it)."""
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class FunctionCallOut(TypedDict):
    name: str
    arguments: str  # JSON text


class ToolCallOut(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class FunctionCallDelta(TypedDict, total=False):
    name: str
    arguments: str


class ToolCallDelta(TypedDict, total=False):
    """A streamed tool call: its first delta has id, type and the name; later ones more arguments."""
    index: Required[int]
    id: str
    type: Literal["function"]
    function: FunctionCallDelta


class ChatDelta(TypedDict, total=False):
    role: Literal["assistant"]
    content: str
    reasoning_content: str
    tool_calls: list[ToolCallDelta]


class ChatChunkChoice(TypedDict):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None


class ChatCompletionChunk(TypedDict):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]  # empty in the closing usage chunk
    usage: Usage | None


class CompletionChunkChoice(TypedDict):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None


class CompletionChunk(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None


CHAT_CHUNK = TypeAdapter(ChatCompletionChunk)
COMPLETION_CHUNK = TypeAdapter(CompletionChunk)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelled field of ours fails here, not in a client


class CompletionChoice(_Response):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: CompletionLogprobs | None = None


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatCompletionMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    reasoning_content: str | None = Field(None, exclude_if=_is_none)  # vLLM's, where the model reasoned
    tool_calls: list[ToolCallOut] | None = Field(None, exclude_if=_is_none)  # where it called tools


class ChatChoice(_Response):
    index: int
    message: ChatCompletionMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "zipserve"
    max_model_len: int  # vLLM's


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorDetail


class TokenizeResponse(_Response):
    """vLLM's /tokenize answer."""
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Response):
    prompt: str


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def finish_reason(engine_reason: str | None) -> FinishReason | None:
    return None if engine_reason is None else "length" if engine_reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str, reason: FinishReason | None,
                     use: Usage | None = None, logprobs: CompletionLogprobs | None = None) -> CompletionChunk:
    """One streamed completion chunk (index < 0: none of the choices, as the closing usage chunk)."""
    choices = [] if index < 0 else [{"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs}]
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": use}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: ChatDelta, reason: FinishReason | None,
               use: Usage | None = None, logprobs: ChatLogprobs | None = None) -> ChatCompletionChunk:
    """One streamed chat chunk (index < 0: none of the choices, as the closing usage chunk)."""
    choices = [] if index < 0 else [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}]
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
            "usage": use}


# ---- logprobs --------------------------------------------------------------------------------------
# `piece(token_id) -> (text, utf-8 bytes)` comes from the tokenizer (workers/tokenizer.py token_piece);
# logprobs per token are {token_id: logprob} with the sampled token first (the engine's shape), of the
# model's raw distribution, before temperature and truncation (vLLM's default, `raw_logprobs`).

def _top(lp: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(lp.items(), key=lambda kv: -kv[1])[:n]


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], n: int, piece) -> ChatLogprobs:
    content = []
    for tok, lp in zip(token_ids, logprobs):
        text, raw = piece(tok)
        top = [{"token": t, "logprob": v, "bytes": list(b)}
               for (t, b), v in ((piece(i), v) for i, v in _top(lp, n))]
        content.append({"token": text, "logprob": lp[tok], "bytes": list(raw), "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, float] | None], n: int, piece,
                        offset: int) -> CompletionLogprobs:
    """The legacy shape; top_logprobs holds the sampled token and the n most likely (as vLLM's). A None entry
    (an echoed prompt's first token, which nothing predicts) is null in both lists."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tok, lp in zip(token_ids, logprobs):
        if lp is None:
            text = piece(tok)[0]
            out["tokens"].append(text)
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            out["text_offset"].append(offset)
            offset += len(text)
            continue
        text = piece(tok)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(lp[tok])
        top = {text: lp[tok]}  # tokens of one text share a key: the sampled one, then the most likely, keep it
        for i, v in _top(lp, n):
            top.setdefault(piece(i)[0], v)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out
