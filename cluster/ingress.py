"""The OpenAI-compatible HTTP ingress (a Ray Serve deployment with a FastAPI app).

Request path: validate (pydantic, 400 in OpenAI's error format) -> admit or refuse with 429 + Retry-After
before any work -> tokenize (chat template for chat) -> routing facts (prompt length, page hashes,
max_tokens, budget) -> the worker deployment's `generate` through a streaming handle, whose router
(scheduler/router.py) picks the worker -> server-sent events or one JSON body. A client that goes away
cancels the worker call, which aborts the request and frees its pages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.util import metrics

from cluster import openai_api as oa
from scheduler.policy import RouteRequest
from scheduler.router import route_request_to_dict
from workers.block_manager import page_hashes
from workers.tokenizer import load_tokenizer

log = logging.getLogger("zipserve.ingress")

app = FastAPI(title="zipserve", description="OpenAI-compatible API over Compressed PagedAttention workers")


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errs = exc.errors()
    first = errs[0] if errs else {}
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        msg = f"request body is not valid JSON: {first.get('ctx', {}).get('error', msg)}"
    elif first.get("type") == "extra_forbidden":
        msg = f"unknown field {loc!r}"
    elif loc:
        msg = f"{loc}: {msg}"
    return JSONResponse(oa.APIError(400, msg, param=loc or None).body(), status_code=400)


@app.exception_handler(oa.APIError)
async def _api_error(request: Request, exc: oa.APIError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class IngressMetrics:
    """zipserve_http_requests_total{endpoint,status}, zipserve_http_ttft_seconds{endpoint},
    zipserve_http_in_flight, zipserve_http_output_tokens_total."""

    def __init__(self):
        self.requests = metrics.Counter("zipserve_http_requests_total", "HTTP requests by endpoint and status",
                                        tag_keys=("endpoint", "status"))
        self.ttft = metrics.Histogram("zipserve_http_ttft_seconds", "time to first token at the ingress",
                                      [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30], tag_keys=("endpoint",))
        self.in_flight = metrics.Gauge("zipserve_http_in_flight", "requests admitted and not finished")
        self.tokens = metrics.Counter("zipserve_http_output_tokens_total", "output tokens sent")


def _sse_event(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


@serve.ingress(app)  # (captures the module's functions now: define helpers above this line)
class OpenAIIngress:
    def __init__(self, worker, model_path: str, model_name: str | None = None, block_size: int = 256,
                 max_concurrent_requests: int = 256, retry_after_s: int = 1):
        self.worker = worker
        self.model_name = model_name or os.path.basename(os.path.normpath(model_path))
        self.tokenizer = load_tokenizer(model_path)
        self.block_size = block_size
        self.limit = max_concurrent_requests
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self._info: dict | None = None
        self.metrics = IngressMetrics()
        log.info("ingress serving %r (%s), at most %d concurrent requests", self.model_name, model_path, self.limit)

    # ---- endpoints -----------------------------------------------------------------------
    @app.get("/health")
    async def health(self):
        return {"status": "ok", "in_flight": self.in_flight}

    @app.get("/v1/models")
    async def models(self):
        info = await self._model_info()
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "zipserve", "max_model_len": info["max_model_len"]}]}

    @app.post("/v1/completions")
    async def completions(self, body: oa.CompletionRequest):
        self._check_model(body.model)
        info = await self._model_info()
        prompts = [self._encode(p, info) for p in body.prompts()]
        return await self._serve("completions", body, prompts, info, body.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: oa.ChatCompletionRequest):
        self._check_model(body.model)
        info = await self._model_info()
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise oa.APIError(400, f"model {self.model_name!r} has no chat template; use /v1/completions")
        text = self.tokenizer.apply_chat_template(body.chat(), add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return await self._serve("chat", body, [self._encode(ids, info)], info, body.requested_max_tokens)

    # ---- the request path ----------------------------------------------------------------
    async def _serve(self, endpoint: str, body, prompts: list[list[int]], info: dict, max_tokens: int | None):
        limit = info["max_model_len"]
        longest = max(map(len, prompts))
        if max_tokens is None:
            max_tokens = limit - longest
        if longest + max_tokens > limit:
            raise oa.APIError(400, f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                   f"context of {limit} tokens", param="max_tokens")
        if body.kv_budget_blocks is not None and info["budget_blocks"] is None:
            raise oa.APIError(400, "kv_budget_blocks needs workers started with compression (budget_blocks)",
                              param="kv_budget_blocks")
        if self.in_flight + len(prompts) > self.limit:  # refused before any work starts
            self.metrics.requests.inc(tags={"endpoint": endpoint, "status": "429"})
            raise oa.APIError(429, f"server is at capacity ({self.limit} concurrent requests); retry later",
                              type_="rate_limit_error", code="overloaded",
                              headers={"Retry-After": str(self.retry_after_s)})
        params = body.sampling_params(max_tokens)
        rid = oa.new_id("chatcmpl" if endpoint == "chat" else "cmpl")
        calls = []
        for i, ids in enumerate(prompts):
            route = route_request_to_dict(RouteRequest(len(ids), tuple(page_hashes(ids, self.block_size)), max_tokens,
                                                       body.kv_budget_blocks))
            request = {"prompt_token_ids": ids, "params": params, "n": body.n, "request_id": f"{rid}-p{i}"}
            calls.append(self.worker.options(stream=True).generate.remote(request, route=route))
        self._admit(len(prompts))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(endpoint, rid, calls, body.n, include_usage, len(prompts)),
                                     media_type="text/event-stream")
        try:
            return await self._collect(endpoint, rid, calls, body.n)
        finally:
            self._release(len(prompts))

    def _admit(self, k: int) -> None:
        self.in_flight += k
        self.metrics.in_flight.set(self.in_flight)

    def _release(self, k: int) -> None:
        self.in_flight -= k
        self.metrics.in_flight.set(self.in_flight)

    async def _events(self, calls, n: int):
        """Merge the workers' streams: yields (choice index, chunk dict)."""
        out: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(p: int, gen):
            try:
                async for chunk in gen:
                    await out.put((p * n + chunk["index"], chunk))
                await out.put((p, done))
            except BaseException as e:  # noqa: BLE001 -- handed to the consumer
                await out.put((p, e))

        tasks = [asyncio.create_task(pump(p, gen)) for p, gen in enumerate(calls)]
        remaining = len(calls)
        try:
            while remaining:
                idx, item = await out.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield idx, item
        finally:
            for t in tasks:
                t.cancel()
            for gen in calls:
                gen.cancel()  # the client left or an error ended the request: free the workers' pages

    async def _collect(self, endpoint: str, rid: str, calls, n: int):
        t0 = time.monotonic()
        texts, reasons, completion, prompt_tokens, cached = {}, {}, {}, {}, {}
        try:
            async for idx, c in self._events(calls, n):
                if idx not in texts:
                    texts[idx] = ""
                    if not texts or len(texts) == 1:
                        self.metrics.ttft.observe(time.monotonic() - t0, tags={"endpoint": endpoint})
                texts[idx] += c["text"]
                self.metrics.tokens.inc(len(c["token_ids"]))
                completion[idx] = c["completion_tokens"]
                prompt_tokens[idx // n], cached[idx // n] = c["prompt_tokens"], c["cached_tokens"]
                if c["finish_reason"] is not None:
                    reasons[idx] = oa.finish_reason(c["finish_reason"])
        except Exception as e:
            raise self._worker_error(endpoint, e) from e
        choices = [{"index": i, "text": texts.get(i, ""), "finish_reason": reasons.get(i, "stop")}
                   for i in range(len(calls) * n)]
        use = oa.usage(sum(prompt_tokens.values()), sum(completion.values()), sum(cached.values()))
        self.metrics.requests.inc(tags={"endpoint": endpoint, "status": "200"})
        build = oa.chat_response if endpoint == "chat" else oa.completion_response
        return build(rid, self.model_name, choices, use)

    async def _sse(self, endpoint: str, rid: str, calls, n: int, include_usage: bool, k: int):
        t0 = time.monotonic()
        first = True
        started: set[int] = set()
        completion, prompt_tokens, cached = {}, {}, {}
        status = "200"
        try:
            async for idx, c in self._events(calls, n):
                if first:
                    self.metrics.ttft.observe(time.monotonic() - t0, tags={"endpoint": endpoint})
                    first = False
                self.metrics.tokens.inc(len(c["token_ids"]))
                completion[idx] = c["completion_tokens"]
                prompt_tokens[idx // n], cached[idx // n] = c["prompt_tokens"], c["cached_tokens"]
                reason = oa.finish_reason(c["finish_reason"])
                if endpoint == "chat":
                    if idx not in started:
                        started.add(idx)
                        yield _sse_event(oa.chat_chunk(rid, self.model_name, idx, {"role": "assistant", "content": ""}, None))
                    delta = {"content": c["text"]} if c["text"] else {}
                    if delta or reason:
                        yield _sse_event(oa.chat_chunk(rid, self.model_name, idx, delta, reason))
                elif c["text"] or reason:
                    yield _sse_event(oa.completion_chunk(rid, self.model_name, idx, c["text"], reason))
            if include_usage:
                use = oa.usage(sum(prompt_tokens.values()), sum(completion.values()), sum(cached.values()))
                chunk = oa.chat_chunk if endpoint == "chat" else oa.completion_chunk
                yield _sse_event(chunk(rid, self.model_name, -1, {} if endpoint == "chat" else "", None, use))
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except Exception as e:  # the response has started: report the error in the stream
            err = self._worker_error(endpoint, e, count=False)
            status = str(err.status)
            yield _sse_event(err.body())
            yield "data: [DONE]\n\n"
        finally:
            self._release(k)
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

    def _encode(self, prompt, info: dict) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise oa.APIError(400, "this model has no tokenizer; send prompt token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if any(not 0 <= t < info["vocab_size"] for t in ids):
                raise oa.APIError(400, f"prompt token ids must be in [0, {info['vocab_size']})", param="prompt")
        if not ids:
            raise oa.APIError(400, "prompt is empty", param="prompt")
        if len(ids) >= info["max_model_len"]:
            raise oa.APIError(400, f"prompt has {len(ids)} tokens; the model accepts at most "
                                   f"{info['max_model_len'] - 1}", param="prompt")
        return ids

    def _worker_error(self, endpoint: str, e: Exception, count: bool = True) -> oa.APIError:
        if isinstance(e, BackPressureError):
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
