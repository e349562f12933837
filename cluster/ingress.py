"""The OpenAI-compatible HTTP ingress (a Ray Serve deployment with a FastAPI app).

Request path: validate (pydantic, 400 in OpenAI's error format) -> admit or refuse with 429 + Retry-After
before any work -> tokenize (chat template for chat) -> routing facts (prompt length, page hashes,
max_tokens, budget) -> the worker deployment's `generate` through a streaming handle, whose router
(scheduler/router.py) picks the worker -> server-sent events or one JSON body. A client that goes away
cancels the worker call, which aborts the request and frees its pages.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
import weakref

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.util import metrics

from zipserve.cluster import openai_api as oa
from zipserve.cluster.channel import Subscriptions, WorkerLostError
from zipserve.cluster.reasoning import ReasoningParser, split_reasoning
from zipserve.cluster.tool_calls import ToolCallParser, parse_tool_calls, structural_tag
from zipserve.scheduler import state_board
from zipserve.scheduler.policy import RouteRequest
from zipserve.scheduler.router import route_request_to_dict
from zipserve.workers.pages import page_hashes
from zipserve.workers.request_limits import RequestError, check_prompt
from zipserve.workers.grammar import validate_structured
from zipserve.workers.tokenizer import load_tokenizer, token_piece

log = logging.getLogger("zipserve.ingress")

app = FastAPI(title="zipserve", description="OpenAI-compatible API over Compressed PagedAttention workers")


def _json(body: BaseModel, status: int = 200, headers: dict | None = None) -> Response:
    """A response model as the HTTP answer (serialised by pydantic, not revalidated by FastAPI)."""
    return Response(body.model_dump_json(), status_code=status, headers=headers, media_type="application/json")


def _error(err: oa.APIError) -> Response:
    return _json(err.body(), err.status, err.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errs = exc.errors()
    first = errs[0] if errs else {}
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    loc = (first.get("ctx") or {}).get("param") or loc  # a model-level check names its param (oa.refuse)
    msg = first.get("msg", "invalid request").removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        msg = f"request body is not valid JSON: {first.get('ctx', {}).get('error', msg)}"
    elif first.get("type") == "extra_forbidden":
        msg = f"unknown field {loc!r}"
    elif loc and first.get("type") != "refused":
        msg = f"{loc}: {msg}"
    return _error(oa.APIError(400, msg, param=loc or None))


MAX_BODY_BYTES = 4 << 20  # the largest request body accepted (a 128k-token prompt as text fits easily)


@app.middleware("http")
async def _limit_body(request: Request, call_next):
    """Refuse bodies over MAX_BODY_BYTES with 413 before reading them (by Content-Length; a chunked body
    is counted as it arrives)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        return _error(oa.APIError(413, f"request body over {MAX_BODY_BYTES} bytes"))
    if length is None and request.method == "POST":
        body = b""
        async for part in request.stream():
            body += part
            if len(body) > MAX_BODY_BYTES:
                return _error(oa.APIError(413, f"request body over {MAX_BODY_BYTES} bytes"))
        request._body = body  # starlette re-reads the cached body
    return await call_next(request)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    """FastAPI's own errors (unparseable body, unknown path, wrong method) in OpenAI's format."""
    status = exc.status_code
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _error(oa.APIError(status, str(exc.detail), type_=kind, headers=getattr(exc, "headers", None)))


@app.exception_handler(oa.APIError)
async def _api_error(request: Request, exc: oa.APIError):
    return _error(exc)


class IngressMetrics:
    """zipserve_http_requests_total{endpoint,status}, zipserve_http_ttft_seconds{endpoint},
    zipserve_http_in_flight, zipserve_http_output_tokens_total, zipserve_http_migrations_total."""

    def __init__(self):
        self.requests = metrics.Counter("zipserve_http_requests_total", "HTTP requests by endpoint and status",
                                        tag_keys=("endpoint", "status"))
        self.ttft = metrics.Histogram("zipserve_http_ttft_seconds", "time to first token at the ingress",
                                      [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30], tag_keys=("endpoint",))
        self.in_flight = metrics.Gauge("zipserve_http_in_flight", "requests admitted and not finished")
        self.tokens = metrics.Counter("zipserve_http_output_tokens_total", "output tokens sent")
        self.migrations = metrics.Counter("zipserve_http_migrations_total",
                                          "samples moved to another worker after theirs died")


def _actor_died(e: BaseException) -> bool:
    """The worker replica's actor is gone (also when its multiplexed stream reported it first)."""
    return isinstance(e, (RayActorError, ActorUnavailableError)) or (
        isinstance(e, WorkerLostError) and isinstance(e.__cause__, (RayActorError, ActorUnavailableError)))


def _worker_lost(e: BaseException) -> bool:
    """The worker replica died, its engine loop is dead, or its stream broke: the request can move elsewhere."""
    if _actor_died(e) or isinstance(e, WorkerLostError):
        return True
    return "EngineDeadError" in type(e).__name__ or "EngineDeadError" in type(getattr(e, "cause", None)).__name__


class _Format:
    """One request's output shaping beyond the text: echoed prompts and logprobs in the endpoint's shape.
    Completions' text offsets run on across a choice's chunks (from the end of an echoed prompt)."""

    def __init__(self, endpoint: str, num_logprobs: int | None, piece, echo: list[str] | None, n: int,
                 reasoning: str | None = None, tool_mode: str | None = None, prompts: list[list[int]] | None = None):
        self.endpoint, self.num_logprobs, self.piece, self.echo, self.n = endpoint, num_logprobs, piece, echo, n
        self.prompts = prompts  # token ids per prompt (an echoed prompt's logprobs name its tokens)
        self.reasoning = reasoning if endpoint == "chat" else None  # a reasoning parser family, or None
        self.tool_mode = tool_mode  # auto | required | named: tool calls are parsed out of the content
        self.offsets: dict[int, int] = {}
        self.parsers: dict[int, ReasoningParser] = {}
        self.tool_parsers: dict[int, ToolCallParser] = {}
        self.called: set[int] = set()  # choices that made tool calls

    def message(self, choice: int, text: str) -> oa.ChatCompletionMessage:
        """A whole chat answer: content, reasoning_content where the model reasoned, tool_calls where it
        called tools."""
        reasoning, content = split_reasoning(self.reasoning, text) if self.reasoning is not None else (None, text)
        calls = None
        if self.tool_mode is not None:
            content, calls = parse_tool_calls(content or "")
            if calls:
                self.called.add(choice)
        return oa.ChatCompletionMessage(content=content, reasoning_content=reasoning, tool_calls=calls or None)

    def delta(self, choice: int, text: str, final: bool) -> oa.ChatDelta:
        """A streamed chat delta for new text (maybe empty: a tag may be held back until it is told apart)."""
        reasoning, content = "", text
        if self.reasoning is not None:
            parser = self.parsers.setdefault(choice, ReasoningParser(self.reasoning))
            reasoning, content = parser.feed(text, final)
        calls = []
        if self.tool_mode is not None:
            content, calls = self.tool_parsers.setdefault(choice, ToolCallParser()).feed(content, final)
            if calls:
                self.called.add(choice)
        return {**({"reasoning_content": reasoning} if reasoning else {}), **({"content": content} if content else {}),
                **({"tool_calls": calls} if calls else {})}

    def finish_reason(self, choice: int, reason: str | None) -> str | None:
        """OpenAI's: tool_calls where the model chose to call tools (a named tool_choice's call ends in stop)."""
        if reason == "stop" and choice in self.called and self.tool_mode != "named":
            return "tool_calls"
        return reason

    def prefix(self, choice: int) -> str:
        return self.echo[choice // self.n] if self.echo else ""

    def logprobs(self, choice: int, token_ids: list[int], logprobs: list[dict],
                 prompt: list | None = None) -> oa.ChatLogprobs | oa.CompletionLogprobs | None:
        """The endpoint's logprobs for new tokens; `prompt` (an echoed prompt's logprobs, from its second
        token on) goes first, its offsets from 0."""
        if self.num_logprobs is None or not (token_ids or prompt):
            return None
        if self.endpoint == "chat":
            return oa.chat_logprobs(token_ids, logprobs, self.num_logprobs, self.piece)
        if prompt is not None:
            token_ids, logprobs = list(self.prompts[choice // self.n]) + list(token_ids), [None, *prompt] + list(logprobs)
        out = oa.completion_logprobs(token_ids, logprobs, self.num_logprobs, self.piece,
                                     0 if prompt is not None else self.offsets.get(choice, len(self.prefix(choice))))
        self.offsets[choice] = out["text_offset"][-1] + len(out["tokens"][-1])
        return out


class _Admission:
    """A response's admitted requests, given back exactly once: when the response ends, or when it is dropped
    before it started."""

    __slots__ = ("ingress", "k")

    def __init__(self, ingress, k: int):
        self.ingress, self.k = ingress, k

    def release(self) -> None:
        k, self.k = self.k, 0
        if k:
            self.ingress._release(k)


class _EventStream(StreamingResponse):
    """A streamed response that ends its events and gives back its admission when it is done being served,
    client gone or not: on a disconnect the server stops reading the generator where it stands (often at a
    `yield`), and waiting for its garbage collection to run its `finally` can take minutes."""

    def __init__(self, events, admission: _Admission, **kwargs):
        super().__init__(events, **kwargs)
        self.admission = admission

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.admission.release()
            await self.body_iterator.aclose()  # its `finally` now: the workers stop generating for it


def _sse_event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


@serve.ingress(app)  # (captures the module's functions now: define helpers above this line)
class OpenAIIngress:
    def __init__(self, worker, model_path: str, model_name: str | None = None, block_size: int = 256,
                 max_concurrent_requests: int = 256, retry_after_s: int = 1, request_timeout_s: float = 600.0,
                 max_migrations: int = 3, max_prompt_tokens: int | None = None, max_tokens_limit: int | None = None,
                 reasoning_parser: str | None = None):
        self.worker = worker
        self.model_name = model_name or os.path.basename(os.path.normpath(model_path))
        self.tokenizer = load_tokenizer(model_path)
        self.piece = token_piece(self.tokenizer) if self.tokenizer is not None else (lambda t: (f"token_id:{t}", b""))
        self.block_size = block_size
        self.limit = max_concurrent_requests
        self.retry_after_s = retry_after_s
        self.request_timeout_s = request_timeout_s
        self.max_migrations = max_migrations
        self.max_prompt_tokens = max_prompt_tokens
        self.max_tokens_limit = max_tokens_limit
        if reasoning_parser is not None:
            ReasoningParser(reasoning_parser)  # an unknown family fails here, at start
        self.reasoning_parser = reasoning_parser
        self.in_flight = 0
        self.migrated = 0
        self._info: dict | None = None
        self.metrics = IngressMetrics()
        # One multiplexed stream from each worker replica this ingress uses (cluster/channel.py).
        self.ingress_id = uuid.uuid4().hex
        self.subscriptions = Subscriptions(
            lambda replica: self.worker.options(stream=True).subscribe.remote(self.ingress_id, route={"replica": replica}))
        log.info("ingress serving %r (%s), at most %d concurrent requests", self.model_name, model_path, self.limit)

    # ---- endpoints -----------------------------------------------------------------------
    @app.get("/health")
    async def health(self):
        return {"status": "ok", "in_flight": self.in_flight, "migrated_samples": self.migrated}

    @app.get("/v1/models", response_model=oa.ModelList)
    async def models(self):
        info = await self._model_info()
        return _json(oa.ModelList(data=[oa.ModelCard(id=self.model_name, max_model_len=info["max_model_len"])]))

    @app.post("/v1/completions", response_model=oa.Completion)
    async def completions(self, body: oa.CompletionRequest):
        self._check_model(body.model)
        info = await self._model_info()
        add_special = body.add_special_tokens is not False
        prompts = [self._encode(p, info, add_special) for p in body.prompts()]
        echo = [p if isinstance(p, str) else self.tokenizer.decode(p) if self.tokenizer is not None else ""
                for p in body.prompts()] if body.echo else None
        return await self._serve("completions", body, prompts, info, body.max_tokens, echo)

    @app.post("/v1/chat/completions", response_model=oa.ChatCompletion)
    async def chat_completions(self, body: oa.ChatCompletionRequest):
        self._check_model(body.model)
        info = await self._model_info()
        ids = self._chat_ids(body)
        constraint = None
        if body.tool_mode is not None:  # the output follows the tool-call format, arguments their schemas
            choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, oa.NamedToolChoice) else body.tool_mode
            try:
                constraint = {"structural_tag": structural_tag([t.model_dump(exclude_none=True) for t in body.tools],
                                                               choice, body.parallel_tool_calls,
                                                               self.reasoning_parser is not None)}
                validate_structured(constraint)
            except ValueError as e:  # a tool's parameters schema that does not compile
                raise oa.APIError(400, f"tools: {e}", param="tools") from None
        return await self._serve("chat", body, [self._encode(ids, info)], info, body.requested_max_tokens,
                                 constraint=constraint)

    @app.post("/tokenize", response_model=oa.TokenizeResponse)
    async def tokenize(self, body: oa.TokenizeRequest):
        """vLLM's: a prompt (or chat messages, through the chat template) as token ids."""
        if body.model is not None:
            self._check_model(body.model)
        info = await self._model_info()
        if body.messages is not None:
            ids = self._chat_ids(body)
        else:
            if self.tokenizer is None:
                raise oa.APIError(400, "this model has no tokenizer", param="prompt")
            ids = self.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
        strs = [self.piece(t)[0] for t in ids] if body.return_token_strs else None
        return _json(oa.TokenizeResponse(count=len(ids), max_model_len=info["max_model_len"], tokens=ids,
                                         token_strs=strs))

    @app.post("/detokenize", response_model=oa.DetokenizeResponse)
    async def detokenize(self, body: oa.DetokenizeRequest):
        if body.model is not None:
            self._check_model(body.model)
        info = await self._model_info()
        if self.tokenizer is None:
            raise oa.APIError(400, "this model has no tokenizer", param="tokens")
        if any(not 0 <= t < info["vocab_size"] for t in body.tokens):
            raise oa.APIError(400, f"tokens must be in [0, {info['vocab_size']})", param="tokens")
        return _json(oa.DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens)))

    def _chat_ids(self, body) -> list[int]:
        """A chat request's messages through the model's chat template, as token ids."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise oa.APIError(400, f"model {self.model_name!r} has no chat template; use /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(body.chat(), **body.template_kwargs())
        except Exception as e:  # a template's own raise_exception, or a bad custom template
            raise oa.APIError(400, f"the chat template failed: {e}", param="messages") from e
        return self.tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))

    # ---- the request path ----------------------------------------------------------------
    async def _serve(self, endpoint: str, body, prompts: list[list[int]], info: dict, max_tokens: int | None,
                     echo: list[str] | None = None, constraint: dict | None = None):
        limit = info["max_model_len"]
        longest = max(map(len, prompts))
        if max_tokens is None:
            max_tokens = limit - longest
        if self.max_tokens_limit is not None and max_tokens > self.max_tokens_limit:
            raise oa.APIError(400, f"max_tokens ({max_tokens}) exceeds this server's limit of {self.max_tokens_limit}",
                              param="max_tokens")
        if longest + max_tokens > limit:
            raise oa.APIError(400, f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                   f"context of {limit} tokens", param="max_tokens")
        if body.kv_budget_blocks is not None and info["budget_blocks"] is None:
            raise oa.APIError(400, "kv_budget_blocks needs workers started with compression (budget_blocks)",
                              param="kv_budget_blocks")
        if body.kv_budget_blocks is not None and body.kv_budget_blocks + 1 > info["total_pages"]:
            raise oa.APIError(400, f"kv_budget_blocks must be <= {info['total_pages'] - 1} (a request holds its "
                                   f"budget + 1 pages; a worker's KV pool has {info['total_pages']})",
                              param="kv_budget_blocks")
        if body.kv_recall_pages is not None and info.get("recall_pages") is None:
            raise oa.APIError(400, "kv_recall_pages needs workers started with compression.recall",
                              param="kv_recall_pages")
        if body.kv_recall_pages is not None and body.kv_recall_pages > info["recall_pages"]:
            raise oa.APIError(400, f"kv_recall_pages must be <= {info['recall_pages']} (the workers' "
                                   f"compression.recall.pages)", param="kv_recall_pages")
        if self.in_flight + len(prompts) > self.limit:  # refused before any work starts
            self.metrics.requests.inc(tags={"endpoint": endpoint, "status": "429"})
            raise oa.APIError(429, f"server is at capacity ({self.limit} concurrent requests); retry later",
                              type_="rate_limit_error", code="overloaded",
                              headers={"Retry-After": str(self.retry_after_s)})
        params = body.sampling_params(max_tokens)
        if constraint is not None:
            params["structured"] = constraint
        rid, created = oa.new_id("chatcmpl" if endpoint == "chat" else "cmpl"), int(time.time())
        fmt = _Format(endpoint, params["logprobs"], self.piece, echo, body.n, self.reasoning_parser,
                      getattr(body, "tool_mode", None), prompts)
        calls = []
        for i, ids in enumerate(prompts):
            route = route_request_to_dict(RouteRequest(len(ids), tuple(page_hashes(ids, self.block_size)), max_tokens,
                                                       body.kv_budget_blocks))
            request = {"prompt_token_ids": ids, "params": params, "n": body.n, "request_id": f"{rid}-p{i}"}
            calls.append((request, route, {j: i * body.n + j for j in range(body.n)}))
        self._admit(len(prompts))
        if body.stream:
            opts = body.stream_options
            admission = _Admission(self, len(prompts))
            events = self._sse(endpoint, rid, created, calls, body.n, bool(opts and opts.include_usage), admission,
                               bool(opts and opts.continuous_usage_stats), fmt)
            # Dropped before it was served (a client that left before the handler returned): an async generator
            # that never started never runs its `finally`, so the admission goes back when the generator does.
            weakref.finalize(events, admission.release)
            return _EventStream(events, admission, media_type="text/event-stream")
        try:
            return _json(await self._collect(endpoint, rid, created, calls, body.n, fmt))
        finally:
            self._release(len(prompts))

    def _admit(self, k: int) -> None:
        self.in_flight += k
        self.metrics.in_flight.set(self.in_flight)

    def _release(self, k: int) -> None:
        self.in_flight -= k
        self.metrics.in_flight.set(self.in_flight)

    async def _events(self, calls, n: int):
        """Run the worker calls and merge their streams: yields (choice index, chunk dict) until every
        sample has finished, or raises. A call whose worker dies moves to another worker (see
        `_run_call`); the whole request is bounded by request_timeout_s."""
        out: asyncio.Queue = asyncio.Queue()
        done = object()
        live: list = []  # handle generators in flight (cancelled when the request ends)

        async def pump(request, route, index_map):
            try:
                await self._run_call(request, route, index_map, out, live, attempt=0)
                await out.put((-1, done))
            except BaseException as e:  # noqa: BLE001 -- handed to the consumer
                await out.put((-1, e))

        tasks = [asyncio.create_task(pump(*c)) for c in calls]
        remaining = len(calls)
        deadline = time.monotonic() + self.request_timeout_s
        try:
            while remaining:
                try:
                    idx, item = await asyncio.wait_for(out.get(), timeout=max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise oa.APIError(504, f"the request exceeded its deadline of {self.request_timeout_s:g} s",
                                      type_="timeout") from None
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield idx, item
        finally:
            for t in tasks:
                t.cancel()
            for gen in live:
                gen.cancel()  # the client left or an error ended the request: free the workers' pages

    async def _run_call(self, request: dict, route: dict, index_map: dict, out: asyncio.Queue, live: list,
                        attempt: int) -> None:
        """Stream one worker call into `out`. Its tokens come over the multiplexed stream of the worker that
        admits it (cluster/channel.py); the call itself carries the request's lifetime. If its worker dies
        (actor lost, engine loop dead, its stream broken), every sample not yet finished is resubmitted with
        the prompt plus the tokens already sent (the new worker prefills them and continues the text
        exactly), up to max_migrations times."""
        sent = {ci: [] for ci in index_map.values()}
        finished: set[int] = set()
        rid = request["request_id"]
        chunks = self.subscriptions.register(rid)
        gen = self.worker.options(stream=True).generate.remote(dict(request, channel=self.ingress_id), route=route)
        live.append(gen)
        watcher = asyncio.create_task(self._watch_call(gen, rid, chunks))
        try:
            while len(finished) < len(index_map):
                chunk = await chunks.get()
                if isinstance(chunk, BaseException):
                    raise chunk
                if "worker_state" in chunk:  # capacity after an admission or a finish: for this process's router
                    ws = chunk.pop("worker_state")
                    state_board.post(ws.pop("replica"), ws)
                ci = index_map[chunk["index"]]
                sent[ci].extend(chunk["token_ids"])
                if chunk["finish_reason"] is not None:
                    finished.add(ci)
                await out.put((ci, chunk))
            return
        except Exception as e:
            if not _worker_lost(e) or attempt >= self.max_migrations:
                raise
            if attempt >= 1 and not _actor_died(e):
                raise  # a second engine died under this request: it may be what kills them, stop here
            error = e
        finally:
            watcher.cancel()
            self.subscriptions.release(rid)
        gen.cancel()  # the old call, if its worker still runs it (a broken stream), frees its pages
        attempt += 1
        todo = [ci for ci in index_map.values() if ci not in finished]
        self.metrics.migrations.inc(len(todo))
        self.migrated += len(todo)
        log.warning("worker lost (%s) during %s: moving %d sample(s) to another worker (attempt %d)",
                    type(error).__name__, request["request_id"], len(todo), attempt)
        await asyncio.sleep(0.2 * attempt)  # let the router see the replica go
        n = request.get("n", 1)
        moved = []
        for ci in todo:
            params = dict(request["params"])
            sample = next(j for j, c in index_map.items() if c == ci)
            if n > 1 and params.get("seed") is not None:
                params["seed"] += sample  # the sample's own stream, as the engine numbers them
            resume = list(request.get("resume_token_ids") or []) + sent[ci]
            moved.append(self._run_call(
                {"prompt_token_ids": request["prompt_token_ids"], "params": params, "n": 1,
                 "request_id": f"{request['request_id']}-m{attempt}-{ci}", "resume_token_ids": resume},
                route, {0: ci}, out, live, attempt))
        await asyncio.gather(*moved)

    async def _watch_call(self, gen, rid: str, chunks: asyncio.Queue) -> None:
        """A request's own call: its one item (at admission) names the worker whose stream carries the
        tokens; its error (worker lost, request refused, backpressure) reaches the request's queue."""
        try:
            async for item in gen:
                self.subscriptions.attach(rid, item["replica"])
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 -- handed to the request
            chunks.put_nowait(e)

    async def _collect(self, endpoint: str, rid: str, created: int, calls, n: int,
                       fmt: "_Format") -> oa.ChatCompletion | oa.Completion:
        t0 = time.monotonic()
        texts, reasons, completion, prompt_tokens, cached, tokens, lps, plps = {}, {}, {}, {}, {}, {}, {}, {}
        try:
            async for idx, c in self._events(calls, n):
                if not texts:  # the request's first token
                    self.metrics.ttft.observe(time.monotonic() - t0, tags={"endpoint": endpoint})
                texts.setdefault(idx, "")
                texts[idx] += c["text"]
                tokens.setdefault(idx, []).extend(c["token_ids"])
                lps.setdefault(idx, []).extend(c.get("logprobs") or [])
                if "prompt_logprobs" in c:
                    plps.setdefault(idx, c["prompt_logprobs"])
                self.metrics.tokens.inc(len(c["token_ids"]))
                completion[idx] = c["completion_tokens"]
                prompt_tokens[idx // n], cached[idx // n] = c["prompt_tokens"], c["cached_tokens"]
                if c["finish_reason"] is not None:
                    reasons[idx] = oa.finish_reason(c["finish_reason"])
        except Exception as e:
            raise self._worker_error(endpoint, e) from e
        use = oa.usage(sum(prompt_tokens.values()), sum(completion.values()), sum(cached.values()))
        chat, choices = endpoint == "chat", []
        for i in range(len(calls) * n):
            message = fmt.message(i, texts.get(i, "")) if chat else None  # first: its tool calls set the reason
            reason = fmt.finish_reason(i, reasons.get(i, "stop"))
            lp = fmt.logprobs(i, tokens.get(i, []), lps.get(i, []), plps.get(i))
            choices.append(oa.ChatChoice(index=i, message=message, finish_reason=reason, logprobs=lp) if chat
                           else oa.CompletionChoice(index=i, text=fmt.prefix(i) + texts.get(i, ""),
                                                    finish_reason=reason, logprobs=lp))
        self.metrics.requests.inc(tags={"endpoint": endpoint, "status": "200"})
        response = oa.ChatCompletion if chat else oa.Completion
        return response(id=rid, created=created, model=self.model_name, choices=choices, usage=use)

    async def _sse(self, endpoint: str, rid: str, created: int, calls, n: int, include_usage: bool,
                   admission: "_Admission", continuous_usage: bool, fmt: "_Format"):
        t0 = time.monotonic()
        first = True
        started: set[int] = set()
        completion, prompt_tokens, cached = {}, {}, {}
        status = "200"
        chat, model = endpoint == "chat", self.model_name
        dump = oa.CHAT_CHUNK.dump_json if chat else oa.COMPLETION_CHUNK.dump_json
        try:
            async for idx, c in self._events(calls, n):
                if first:
                    self.metrics.ttft.observe(time.monotonic() - t0, tags={"endpoint": endpoint})
                    first = False
                self.metrics.tokens.inc(len(c["token_ids"]))
                completion[idx] = c["completion_tokens"]
                prompt_tokens[idx // n], cached[idx // n] = c["prompt_tokens"], c["cached_tokens"]
                reason = oa.finish_reason(c["finish_reason"])
                use = (oa.usage(sum(prompt_tokens.values()), sum(completion.values()), sum(cached.values()))
                       if continuous_usage else None)
                lp = fmt.logprobs(idx, c["token_ids"], c.get("logprobs") or [],
                                  c.get("prompt_logprobs") if idx not in started else None)
                if chat:
                    if idx not in started:
                        started.add(idx)
                        opening = use and dict(use, completion_tokens=0, total_tokens=use["prompt_tokens"])
                        yield _sse_event(dump(oa.chat_chunk(rid, created, model, idx,
                                                            {"role": "assistant", "content": ""}, None, opening)))
                    delta = fmt.delta(idx, c["text"], reason is not None)
                    reason = fmt.finish_reason(idx, reason)
                    if delta or reason or lp:
                        yield _sse_event(dump(oa.chat_chunk(rid, created, model, idx, delta, reason, use, lp)))
                else:
                    text = c["text"]
                    if idx not in started:
                        started.add(idx)
                        text = fmt.prefix(idx) + text
                    if text or reason or lp:
                        yield _sse_event(dump(oa.completion_chunk(rid, created, model, idx, text, reason, use, lp)))
            if include_usage:
                use = oa.usage(sum(prompt_tokens.values()), sum(completion.values()), sum(cached.values()))
                closing = (oa.chat_chunk(rid, created, model, -1, {}, None, use) if chat
                           else oa.completion_chunk(rid, created, model, -1, "", None, use))
                yield _sse_event(dump(closing))
            yield SSE_DONE
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except Exception as e:  # the response has started: report the error in the stream
            err = self._worker_error(endpoint, e, count=False)
            status = str(err.status)
            yield _sse_event(err.body().model_dump_json().encode())
            yield SSE_DONE
        finally:
            admission.release()
            self.metrics.requests.inc(tags={"endpoint": endpoint, "status": status})

    # ---- helpers -------------------------------------------------------------------------
    async def _model_info(self) -> dict:
        if self._info is None:
            try:
                self._info = await self.worker.model_info.remote()
            except Exception as e:
                raise oa.APIError(503, f"no worker is available: {e}", type_="service_unavailable",
                                  headers={"Retry-After": str(self.retry_after_s)}) from e
        return self._info

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise oa.APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                              param="model", code="model_not_found")

    def _encode(self, prompt, info: dict, add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise oa.APIError(400, "this model has no tokenizer; send prompt token ids")
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            ids = list(prompt)
        try:
            check_prompt(ids, info["vocab_size"], info["max_model_len"], self.max_prompt_tokens)
        except RequestError as e:
            raise oa.APIError(400, str(e), param=e.param) from None
        return ids

    def _worker_error(self, endpoint: str, e: Exception, count: bool = True) -> oa.APIError:
        if isinstance(e, oa.APIError):
            err = e
        elif isinstance(e, BackPressureError):
            err = oa.APIError(503, "workers are at capacity; retry later", type_="service_unavailable",
                              code="overloaded", headers={"Retry-After": str(self.retry_after_s)})
        elif isinstance(e, ValueError):
            err = oa.APIError(400, str(e).strip().splitlines()[-1])
        else:
            log.exception("request failed in a worker")
            err = oa.APIError(503, f"the request failed in a worker: {type(e).__name__}", type_="service_unavailable",
                              headers={"Retry-After": str(self.retry_after_s)})
        if count:
            self.metrics.requests.inc(tags={"endpoint": endpoint, "status": str(err.status)})
        return err
