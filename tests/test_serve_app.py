"""The serving app end to end on CPU: Ray Serve, 2 worker replicas (tiny Qwen3 with a chat template), the
OpenAI ingress, driven by the unchanged `openai` client and raw HTTP. The oracle is the engine itself
(`LLM.generate` with the same config and greedy params), whose greedy parity with transformers is
proved in test_parity.py."""

import asyncio
import json
import os
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
from ray import serve  # noqa: E402

from zipserve.cluster.app import build_app  # noqa: E402
from tests.serving import app_url  # noqa: E402
from tests.waiting import wait_until  # noqa: E402
from zipserve.workers import LLM, SamplingParams  # noqa: E402
from zipserve.workers.models.random_folder import build_model_folder  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ENGINE = {"block_size": 16, "num_blocks": 200, "max_model_len": 256, "max_num_seqs": 16, "budget_blocks": 4,
          "compression": {"query_window": 8}}
NAME = "tiny"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = build_model_folder(str(tmp_path_factory.mktemp("serve-model")), "qwen3", max_pos=512)
    cfg_file = os.path.join(path, "tokenizer_config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg["chat_template"] = CHAT_TEMPLATE
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    return path


@pytest.fixture(scope="module")
def serve_port(local_ray):
    """Serve as `zipserve serve` runs it: throughput-optimized (direct ingress, gRPC between deployments)."""
    with local_ray(num_cpus=2, serve=True, throughput_optimized=True) as port:
        yield port


@pytest.fixture(scope="module")
def server(model_path, serve_port):
    """The main app's URL: its ingress replica's own port. The second app, with a tiny admission limit (the
    overload test) and the deepseek_r1 reasoning parser, is reached through Serve's proxy at /small, so both
    HTTP paths are exercised."""
    serve.run(build_app({"model": model_path, "model_name": NAME, "engine": ENGINE,
                         "workers": {"num_replicas": 2, "num_cpus": 0},
                         "ingress": {"max_concurrent_requests": 64}}), name="zipserve", route_prefix="/")
    serve.run(build_app({"model": model_path, "model_name": NAME, "engine": ENGINE,
                         "workers": {"num_replicas": 1, "num_cpus": 0},
                         "ingress": {"max_concurrent_requests": 3, "retry_after_s": 2,
                                     "reasoning_parser": "deepseek_r1"}}),
              name="small", route_prefix="/small")
    url = app_url(serve_port)
    assert url != f"http://127.0.0.1:{serve_port}", "direct ingress is off: the app answers only through the proxy"
    return url


@pytest.fixture(scope="module")
def proxy(serve_port, server):
    return f"http://127.0.0.1:{serve_port}"


@pytest.fixture(scope="module")
def oracle(model_path):
    llm = LLM(model_path, **ENGINE)

    def greedy(prompt, max_tokens, **kw):
        return llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens, **kw), use_tqdm=False)[0]

    greedy.tokenizer = llm.tokenizer
    return greedy


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


def _chat_prompt(oracle, messages):
    return oracle.tokenizer.encode(oracle.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                       tokenize=False), add_special_tokens=False)


PROMPTS = ["The quick brown fox", "def add(a, b):", "Once upon a time, in a land far away, there lived"]


def test_completions_equal_engine_greedy(client, oracle):
    for p in PROMPTS:
        want = oracle(p, 24, ignore_eos=True)
        got = client.completions.create(model=NAME, prompt=p, max_tokens=24, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert got.choices[0].text == want.text
        assert got.choices[0].finish_reason == "length"
        assert got.usage.completion_tokens == 24 and got.usage.prompt_tokens == len(want.prompt_token_ids)


def test_streamed_completion_equals_unstreamed(client, oracle):
    want = oracle(PROMPTS[2], 30, ignore_eos=True)
    stream = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=30, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    text, reasons, usage = "", [], None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
            reasons.append(chunk.choices[0].finish_reason)
        if chunk.usage:
            usage = chunk.usage
    assert text == want.text
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert usage.completion_tokens == 30


def test_chat_streamed_and_not_equal_engine_greedy(client, oracle):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
    want = oracle(_chat_prompt(oracle, messages), 20, ignore_eos=True)
    got = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want.text
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_samples(client, oracle):
    want = oracle(PROMPTS[0], 12, ignore_eos=True)
    greedy = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0, n=3,
                                       extra_body={"ignore_eos": True})
    assert sorted(c.index for c in greedy.choices) == [0, 1, 2]
    assert all(c.text == want.text for c in greedy.choices)
    sampled = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=1.0, n=4, seed=7,
                                        extra_body={"ignore_eos": True})
    texts = [c.text for c in sorted(sampled.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1, "seeded samples must differ from each other"
    again = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=1.0, n=4, seed=7,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts


def test_stop_strings(client, oracle):
    full = oracle(PROMPTS[1], 40, ignore_eos=True).text
    stop = next(full[i : i + 2] for i in range(4, len(full) - 2) if full[i : i + 2].strip() and "\ufffd" not in full[i : i + 2])
    want = oracle(PROMPTS[1], 40, ignore_eos=True, stop=[stop])
    got = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=40, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == want.text == full[: full.index(stop)]
    assert got.choices[0].finish_reason == "stop"
    # Streamed, the pieces add up to the same text: none of the stop string goes out before it is recognised
    # (its first characters may arrive a token before its last).
    stream = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=40, temperature=0, stop=[stop],
                                       stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_models_and_health(server):
    models = httpx.get(server + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [NAME]
    assert httpx.get(server + "/health").status_code == 200


BAD = [
    ("/v1/completions", b'{"model": "tiny", "prompt": "x",', "not valid JSON"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 100000}, "exceeds the model's context"),
    ("/v1/completions", {"model": "tiny", "prompt": "x" * 3000, "max_tokens": 4}, "prompt has"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "bogus_field": 1}, "unknown field"),
    ("/v1/completions", {"model": "tiny", "prompt": [999999], "max_tokens": 4}, "token ids"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "presence_penalty": 5}, "presence_penalty"),
    ("/v1/completions", {"model": "tiny"}, "prompt"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, "role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 99}, "n"),
]


@pytest.mark.parametrize("path, body, needle", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_a_clear_400(server, path, body, needle):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server + path, timeout=60, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] or needle == err.get("param"), err
    assert err["type"] == "invalid_request_error"


def test_unknown_model_is_404_and_server_keeps_serving(server, client, oracle):
    r = httpx.post(server + "/v1/completions", json={"model": "gpt-4", "prompt": "x"}, timeout=60)
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
    want = oracle(PROMPTS[0], 8, ignore_eos=True)
    got = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == want.text


def test_overload_is_refused_with_429_before_work(proxy, oracle):
    """12 concurrent streams against an ingress that admits 3: the rest get 429 + Retry-After with no
    token; every admitted stream completes with the right text."""
    want = oracle(PROMPTS[2], 60, ignore_eos=True).text
    body = {"model": NAME, "prompt": PROMPTS[2], "max_tokens": 60, "temperature": 0, "stream": True, "ignore_eos": True}

    async def one(c: httpx.AsyncClient):
        async with c.stream("POST", proxy + "/small/v1/completions", json=body) as r:
            if r.status_code != 200:
                return r.status_code, r.headers.get("retry-after"), (await r.aread()).decode()
            text = ""
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += "".join(ch["text"] for ch in json.loads(line[6:])["choices"])
            return 200, None, text

    async def burst():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*[one(c) for _ in range(12)])

    results = asyncio.run(burst())
    codes = [r[0] for r in results]
    assert codes.count(200) >= 3 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
    for code, retry, payload in results:
        if code == 429:
            assert retry == "2" and "capacity" in json.loads(payload)["error"]["message"]
        else:
            assert payload == want


def _replica_stats(app: str, replicas: int) -> dict:
    handle = serve.get_deployment_handle("EngineWorker", app_name=app)
    seen = {}
    deadline = time.time() + 30
    while len(seen) < replicas and time.time() < deadline:
        s = handle.stats.remote().result(timeout_s=30)
        seen[s["replica"]] = s
    assert len(seen) == replicas
    return seen


def test_cancelled_streams_free_their_pages(server):
    """50 streams closed after their first tokens: every replica returns to an idle pool."""
    body = {"model": NAME, "prompt": PROMPTS[2], "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}

    async def one(c: httpx.AsyncClient):
        async with c.stream("POST", server + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            n = 0
            async for line in r.aiter_lines():
                n += line.startswith("data: ")
                if n >= 3:
                    break  # closes the connection mid-stream

    async def burst():
        async with httpx.AsyncClient(timeout=120) as c:
            await asyncio.gather(*[one(c) for _ in range(50)])

    asyncio.run(burst())
    last = {}

    def idle():
        last.update(_replica_stats("zipserve", 2))
        return all(s["running"] == 0 and s["waiting"] == 0 and s["free_pages"] == s["total_pages"]
                   for s in last.values())

    wait_until(idle, timeout=60, interval=0.5, message=lambda: f"pages returned after cancellation: {last}")
    # They were cancelled, not run to completion: far fewer than 50 x 200 tokens were generated.
    assert sum(s["generated_tokens"] for s in last.values()) < 50 * 200


def test_router_spreads_over_replicas(server, client):
    before = {r: s["generated_tokens"] for r, s in _replica_stats("zipserve", 2).items()}

    async def many():
        c = openai.AsyncOpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)
        await asyncio.gather(*[c.completions.create(model=NAME, prompt=f"{i} little pigs went to market", max_tokens=40,
                                                    temperature=0, extra_body={"ignore_eos": True}) for i in range(16)])

    asyncio.run(many())
    after = {r: s["generated_tokens"] for r, s in _replica_stats("zipserve", 2).items()}
    assert all(after[r] > before[r] for r in after), (before, after)


def test_first_and_last_chunks_carry_the_workers_capacity(server, oracle):
    """Admission and finish are the big changes of a worker's capacity: they ride back on the response
    (scheduler/state_board.py), fresher than the controller's 100 ms poll."""
    handle = serve.get_deployment_handle("EngineWorker", app_name="zipserve").options(stream=True)
    ids = oracle.tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    request = {"prompt_token_ids": ids, "params": {"temperature": 0, "max_tokens": 20, "ignore_eos": True}}
    chunks = list(handle.generate.remote(request))
    assert len(chunks) >= 2 and all("worker_state" not in c for c in chunks[1:-1])
    first, last = chunks[0]["worker_state"], chunks[-1]["worker_state"]
    assert set(first) == {"replica", "free_pages", "running", "waiting", "timestamp"} and first["replica"] == last["replica"]
    assert first["running"] >= 1 and last["timestamp"] > first["timestamp"]
    assert last["running"] == first["running"] - 1 and last["free_pages"] > first["free_pages"]  # its pages came back


def test_many_streams_over_the_multiplexed_channel_are_exact_ordered_and_none_starved(server, oracle):
    """24 concurrent streamed chats share each worker's one stream to the ingress (cluster/channel.py):
    every stream's text equals the engine's greedy output (so its chunks arrived complete and in order),
    per-chunk usage (continuous_usage_stats) counts up to max_tokens, and most streams got tokens before
    the first one finished (none was held back until the others were done)."""
    prompts = [f"{i} little pigs went to market and" for i in range(24)]
    want = {p: oracle(_chat_prompt(oracle, [{"role": "user", "content": p}]), 48, ignore_eos=True).text for p in prompts}

    async def one(c: httpx.AsyncClient, p: str):
        body = {"model": NAME, "messages": [{"role": "user", "content": p}], "max_tokens": 48, "temperature": 0,
                "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        text, counts, first, finish = "", [], None, None
        async with c.stream("POST", server + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                assert ev["usage"] is not None  # every chunk carries usage so far
                counts.append(ev["usage"]["completion_tokens"])
                for ch in ev["choices"]:
                    if ch["delta"].get("content"):
                        first = first or time.monotonic()
                        text += ch["delta"]["content"]
                    if ch["finish_reason"]:
                        finish = time.monotonic()
        return p, text, counts, first, finish

    async def burst():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*[one(c, p) for p in prompts])

    results = asyncio.run(burst())
    for p, text, counts, first, finish in results:
        assert text == want[p], p
        assert counts == sorted(counts) and counts[-1] == 48
        assert first is not None and finish is not None
    # Two replicas of 16 slots run all 24 together. A channel that held streams back until others were done
    # would let at most one stream per replica start before the first finish. Concurrent delivery lets
    # them all start, less any the ingress admitted late on a loaded machine; so at least half must.
    first_finish = min(r[4] for r in results)
    started = sum(r[3] < first_finish for r in results)
    assert started >= len(results) // 2, (started, sorted(r[3] - first_finish for r in results))


# ---- API parity: logprobs, echo, neutral fields, vLLM extras, errors naming their param ---------------

def _teacher_forced_logprobs(model_path, prompt_ids, output_ids):
    """The oracle: transformers' log-softmax over the model's logits at each generated position (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt_ids + output_ids])).logits[0].float()
    return logits.log_softmax(-1)[len(prompt_ids) - 1 : -1]


def test_chat_logprobs_equal_transformers_streamed_and_not(client, oracle, model_path):
    messages = [{"role": "user", "content": PROMPTS[0]}]
    ids = _chat_prompt(oracle, messages)
    kw = dict(model=NAME, messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3,
              extra_body={"ignore_eos": True})
    got = client.chat.completions.create(**kw)
    content = got.choices[0].logprobs.content
    assert len(content) == 12  # the bytes are exact: together they are the text, even where a token splits a character
    assert b"".join(bytes(c.bytes) for c in content).decode("utf-8", errors="replace") == got.choices[0].message.content
    out_ids = oracle(ids, 12, ignore_eos=True).token_ids
    ref = _teacher_forced_logprobs(model_path, ids, list(out_ids))
    for pos, (c, tok) in enumerate(zip(content, out_ids)):
        assert bytes(c.bytes).decode("utf-8", errors="replace") == c.token
        assert abs(c.logprob - ref[pos, tok].item()) < 1e-4
        vals, top_ids = ref[pos].topk(3)
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
        assert [bytes(t.bytes).decode("utf-8", errors="replace") for t in c.top_logprobs] == \
               [oracle.tokenizer.decode([i]) for i in top_ids.tolist()]
        assert all(abs(t.logprob - v) < 1e-4 for t, v in zip(c.top_logprobs, vals.tolist()))
    streamed = []
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert [(c.token, c.logprob, [t.token for t in c.top_logprobs]) for c in streamed] == \
           [(c.token, c.logprob, [t.token for t in c.top_logprobs]) for c in content]


def test_completion_logprobs_and_echo(client, oracle, model_path):
    want = oracle(PROMPTS[2], 10, ignore_eos=True)
    got = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=10, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True})
    lp = got.choices[0].logprobs
    assert "".join(lp.tokens) == got.choices[0].text == want.text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    ref = _teacher_forced_logprobs(model_path, list(want.prompt_token_ids), list(want.token_ids))
    for pos, (tok, text, value, top) in enumerate(zip(want.token_ids, lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        assert abs(value - ref[pos, tok].item()) < 1e-4 and top[text] == value and 1 <= len(top) <= 3  # same-text tokens share a key
    streamed = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=10, temperature=0, logprobs=2,
                                         stream=True, extra_body={"ignore_eos": True})
    tokens, offsets = [], []
    for chunk in streamed:
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == lp.tokens and offsets == lp.text_offset
    echoed = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=10, temperature=0, echo=True,
                                       extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == PROMPTS[2] + want.text
    # echo + logprobs (how evaluation harnesses score text): the prompt's tokens first, the first one unscored
    scored = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=1, temperature=0, echo=True,
                                       logprobs=2, extra_body={"ignore_eos": True})
    prompt_ids = list(want.prompt_token_ids)
    ref = _teacher_forced_logprobs(model_path, prompt_ids[:1], prompt_ids[1:] + [want.token_ids[0]])
    slp = scored.choices[0].logprobs
    assert scored.choices[0].text == PROMPTS[2] + oracle(PROMPTS[2], 1, ignore_eos=True).text
    assert len(slp.tokens) == len(prompt_ids) + 1 and slp.token_logprobs[0] is None and slp.top_logprobs[0] is None
    assert "".join(slp.tokens[: len(prompt_ids)]) == PROMPTS[2] and slp.text_offset[0] == 0
    for pos, tok in enumerate(prompt_ids[1:] + [want.token_ids[0]]):
        assert abs(slp.token_logprobs[pos + 1] - ref[pos, tok].item()) < 1e-4 and 1 <= len(slp.top_logprobs[pos + 1]) <= 3
    stream = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=1, temperature=0, echo=True,
                                       logprobs=2, stream=True, extra_body={"ignore_eos": True})
    parts = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].logprobs]
    assert sum((p.token_logprobs for p in parts), []) == slp.token_logprobs


def test_neutral_openai_fields_and_vllm_extras_change_nothing(client, oracle):
    messages = [{"role": "user", "content": PROMPTS[1]}]
    base = dict(model=NAME, messages=messages, max_tokens=16, temperature=0)
    plain = client.chat.completions.create(**base, extra_body={"ignore_eos": True}).choices[0].message.content
    got = client.chat.completions.create(
        **base, store=False, service_tier="auto", metadata={"team": "eval"}, parallel_tool_calls=False,
        prediction={"type": "content", "content": "x"}, modalities=["text"], reasoning_effort="low",
        safety_identifier="u1", prompt_cache_key="k", user="someone", stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},
        extra_body={"ignore_eos": True, "skip_special_tokens": True, "spaces_between_special_tokens": True,
                    "chat_template_kwargs": {"enable_thinking": False}, "add_generation_prompt": True,
                    "repetition_penalty": 1.0, "min_tokens": 0, "priority": 0})
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == plain


def test_continue_final_message_continues_the_assistant_text(client, oracle):
    messages = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon"}]
    text = oracle.tokenizer.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True,
                                                tokenize=False)
    assert text.endswith("Once upon")
    want = oracle(oracle.tokenizer.encode(text, add_special_tokens=False), 12, ignore_eos=True)
    got = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True, "add_generation_prompt": False,
                                                     "continue_final_message": True})
    assert got.choices[0].message.content == want.text


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"12": 200}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"dog": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "bad_words": [" "]}, "bad_words"),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/chat/completions", {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"description": "no name"}}]},
     "tools.0.function.name"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "x"}}}]},
     "tools"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "s", "schema": {"type": "object", "properties": 5}}}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "(("}}, "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "42"}]}, "messages"),
    ("/v1/chat/completions", {"audio": {"voice": "alloy"}}, "audio"),
    ("/v1/chat/completions", {"continue_final_message": True}, "continue_final_message"),
    ("/v1/chat/completions", {"service_tier": "fastest"}, "service_tier"),
    ("/v1/completions", {"prompt": "x", "kv_budget_blocks": 200}, "kv_budget_blocks"),  # budget + 1 > the 200 pages
    ("/v1/completions", {"prompt": "x", "kv_recall_pages": 1}, "kv_recall_pages"),  # workers keep no evictions
    ("/v1/chat/completions", {"kv_recall_pages": -1}, "kv_recall_pages"),
], ids=lambda v: v if isinstance(v, str) and not v.startswith("/") else None)
def test_refusals_name_their_param_in_openai_format(server, path, body, param):
    body = {"model": NAME, **({"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {}), **body}
    if param == "tools":  # (a tool call that compiles nothing must not break the next request either)
        assert httpx.post(server + path, json=body, timeout=60).status_code == 400
    r = httpx.post(server + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert not err["message"].startswith("Value error") and param in err["message"], err


def test_penalties_and_logit_bias_over_http_equal_the_engine(client, oracle):
    """The engine's penalties are checked against transformers in test_penalties.py; here the API's fields
    reach it unchanged (OpenAI's string token ids in logit_bias included)."""
    kw = dict(ignore_eos=True, frequency_penalty=0.8, presence_penalty=0.4, repetition_penalty=1.3)
    want = oracle(PROMPTS[2], 20, **kw)
    got = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=20, temperature=0,
                                    frequency_penalty=0.8, presence_penalty=0.4,
                                    extra_body={"ignore_eos": True, "repetition_penalty": 1.3})
    assert got.choices[0].text == want.text and want.text != oracle(PROMPTS[2], 20, ignore_eos=True).text
    plain = oracle(PROMPTS[1], 12, ignore_eos=True)
    word = oracle.tokenizer.decode(list(plain.token_ids[2:4])).strip()
    banned = oracle(PROMPTS[1], 12, ignore_eos=True, bad_words=[word])
    got = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True, "bad_words": [word]})
    assert got.choices[0].text == banned.text != plain.text
    forced = oracle(PROMPTS[0], 5, ignore_eos=True, logit_bias={42: 100.0})
    got = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                    logit_bias={"42": 100}, extra_body={"ignore_eos": True})
    assert got.choices[0].text == forced.text and list(forced.token_ids) == [42] * 5


def test_reasoning_parser_puts_thinking_in_reasoning_content(proxy, oracle):
    """The /small app runs the deepseek_r1 parser (its template opens <think> in the prompt, so output is
    reasoning until </think>). The tiny model never writes </think>: all of its answer is reasoning, none is
    content, streamed and not; the main app (no parser) gives the same text as content."""
    messages = [{"role": "user", "content": PROMPTS[0]}]
    want = oracle(_chat_prompt(oracle, messages), 16, ignore_eos=True).text
    assert "</think>" not in want
    c = openai.OpenAI(base_url=proxy + "/small/v1", api_key="none", max_retries=0, timeout=120)
    got = c.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].message.content is None and got.choices[0].message.reasoning_content == want
    parts = {"reasoning_content": "", "content": ""}
    for chunk in c.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}):
        if chunk.choices:
            d = chunk.choices[0].delta
            parts["reasoning_content"] += getattr(d, "reasoning_content", None) or ""
            parts["content"] += d.content or ""
    assert parts == {"reasoning_content": want, "content": ""}


# ---- structured output and tools ---------------------------------------------------------------------

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather by city", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"],
    "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,10}$"}}}}}


def _no_whitespace(oracle) -> dict:
    """A bias against whitespace-only tokens (a random model likes them, and JSON allows them anywhere)."""
    tok = oracle.tokenizer
    return {i: -100.0 for t, i in tok.get_vocab().items() if tok.convert_tokens_to_string([t]).isspace()}


def test_json_schema_response_format_validates_and_equals_the_engine(client, oracle):
    import jsonschema

    messages = [{"role": "user", "content": PROMPTS[0]}]
    bias = _no_whitespace(oracle)
    want = oracle(_chat_prompt(oracle, messages), 120, structured={"json": PERSON}, logit_bias=bias)
    kw = dict(model=NAME, messages=messages, max_tokens=120, temperature=0, logit_bias={str(t): v for t, v in bias.items()},
              response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    got = client.chat.completions.create(**kw)
    assert got.choices[0].finish_reason == "stop" and got.choices[0].message.content == want.text
    jsonschema.validate(json.loads(want.text), PERSON)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)
    assert streamed == want.text
    mode = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=150, temperature=0,
                                     logit_bias={str(t): v for t, v in bias.items()},
                                     extra_body={"response_format": {"type": "json_object"}})
    assert mode.choices[0].text == oracle(PROMPTS[1], 150, structured={"json_object": True}, logit_bias=bias).text
    assert mode.choices[0].text.startswith("{")  # (this random model's object never closes by greedy decoding;
    # JSON mode's outputs parse on a real model: tests/test_structured.py, 20 prompts)


def _streamed_tool_calls(stream):
    calls, reason, content = {}, None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        content += ch.delta.content or ""
        for d in ch.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id:
                call["id"], call["name"] = d.id, d.function.name
            call["arguments"] += d.function.arguments or ""
        reason = ch.finish_reason or reason
    return content, list(calls.values()), reason


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_a_tool_call_round_trip_with_the_openai_sdk(client, oracle, tool_choice):
    import jsonschema

    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model=NAME, messages=messages, tools=[WEATHER], tool_choice=tool_choice, max_tokens=120,
              temperature=0, parallel_tool_calls=False,
              logit_bias={str(t): v for t, v in _no_whitespace(oracle).items()})
    got = client.chat.completions.create(**kw)
    msg, reason = got.choices[0].message, got.choices[0].finish_reason
    assert reason == ("stop" if isinstance(tool_choice, dict) else "tool_calls")
    assert msg.content is None and len(msg.tool_calls) == 1, msg
    call = msg.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    content, calls, s_reason = _streamed_tool_calls(client.chat.completions.create(stream=True, **kw))
    assert content == "" and s_reason == reason
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", call.function.arguments)]
    # The conversation goes on with the call and its result, as a client sends them back.
    follow = client.chat.completions.create(model=NAME, max_tokens=8, temperature=0, tools=[WEATHER], messages=messages + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21}'}])
    assert follow.choices[0].message.role == "assistant"


def test_tool_choice_none_leaves_the_output_alone(client, oracle):
    messages = [{"role": "user", "content": PROMPTS[2]}]
    plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    got = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0, tools=[WEATHER],
                                         tool_choice="none", extra_body={"ignore_eos": True})
    assert got.choices[0].message.tool_calls is None
    assert got.choices[0].message.content == plain.choices[0].message.content  # (this template ignores tools)


def test_tokenize_and_detokenize_as_vllm(server, oracle):
    r = httpx.post(server + "/tokenize", json={"model": NAME, "prompt": PROMPTS[0], "return_token_strs": True}, timeout=60)
    body = r.json()
    assert r.status_code == 200 and body["tokens"] == oracle.tokenizer.encode(PROMPTS[0]) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == ENGINE["max_model_len"] and "".join(body["token_strs"]) == PROMPTS[0]
    messages = [{"role": "user", "content": PROMPTS[1]}]
    r = httpx.post(server + "/tokenize", json={"model": NAME, "messages": messages}, timeout=60)
    assert r.json()["tokens"] == _chat_prompt(oracle, messages)
    r = httpx.post(server + "/detokenize", json={"model": NAME, "tokens": body["tokens"]}, timeout=60)
    assert r.status_code == 200 and r.json() == {"prompt": PROMPTS[0]}
    for path, bad, param in (("/tokenize", {"prompt": "x", "messages": messages}, "prompt"),
                             ("/detokenize", {"tokens": [10 ** 9]}, "tokens"), ("/detokenize", {"tokens": "x"}, "tokens")):
        r = httpx.post(server + path, json=bad, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
