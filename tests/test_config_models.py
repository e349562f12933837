"""The config models (workers/config.py, cluster/app.py, cluster/batch.py) and the API's response models
(cluster/openai_api.py), without a server: every YAML under configs/ loads, unknown keys are named with the
known ones, values are strict, and what the ingress sends parses with the unchanged `openai` SDK."""

import json
import pathlib

import pytest
import yaml

from zipserve.workers.config import CompressionConfig, EngineConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
YAMLS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("name", YAMLS)
def test_every_yaml_under_configs_loads(name, qwen3_path):
    """Engine presets as EngineConfig, Serve configs' app args as the app config; Ray cluster configs are
    checked against Ray's schema in test_serve_configs.py."""
    path = ROOT / name
    with open(path) as f:
        data = yaml.safe_load(f)
    if name.startswith("configs/engine/"):
        assert EngineConfig.from_yaml(str(path), model=qwen3_path).block_size >= 1
    elif "applications" in data:
        pytest.importorskip("ray")
        from zipserve.cluster.app import load_app_config
        from zipserve.cluster.cli import load_app_args

        args = load_app_args(str(path))
        if args.get("engine_config"):
            args["engine_config"] = str(ROOT / args["engine_config"])
        app, engine = load_app_config(dict(args, model=qwen3_path, engine=dict(args["engine"], backend="torch")))
        assert app.model == qwen3_path and engine.block_size >= 1
    else:
        assert "provider" in data, f"{name}: neither an engine preset, a Serve config nor a Ray cluster config"


def test_unknown_keys_are_named_with_the_known_ones(qwen3_path):
    with pytest.raises(ValueError, match=r"unknown engine config key\(s\): blok_size; known: .*block_size"):
        EngineConfig(model=qwen3_path, blok_size=16)
    with pytest.raises(ValueError, match=r"unknown compression option\(s\): a, b; known: .*query_window"):
        EngineConfig.from_kwargs(qwen3_path, compression={"a": 1, "b": 2})
    with pytest.raises(ValueError, match=r"unknown compression option\(s\): use_similarity"):
        CompressionConfig(use_similarity=True)


@pytest.mark.parametrize("bad", [
    dict(block_size="16"), dict(max_num_seqs=True), dict(gpu_memory_utilization="0.9"), dict(enforce_eager=1),
    dict(gpu_memory_utilization=0), dict(load_format="gguf"), dict(compression=dict(query_window=2.0)),
    dict(compression=dict(score_decay=float("nan"))), dict(admission_headroom_steps=-1),
    dict(admission_headroom_steps=1.5)])
def test_values_are_strict(bad, qwen3_path):
    with pytest.raises(ValueError, match=next(iter(bad))):
        EngineConfig.from_kwargs(qwen3_path, **bad)


def test_configs_are_frozen_hashable_and_keep_their_methods(qwen3_path):
    cfg = EngineConfig.from_kwargs(pathlib.Path(qwen3_path), block_size=16, budget_blocks=4,
                                   compression={"query_window": 8, "recent_fraction": 0.5})
    assert cfg.model == qwen3_path and isinstance(cfg.compression, CompressionConfig)
    with pytest.raises(ValueError, match="frozen"):
        cfg.block_size = 8
    resolved = cfg.compression.for_compression(keep=64, prompt_tokens=10)
    assert (resolved.num_sink_tokens, resolved.recent_window) == (0, 32) and resolved.query_window == 8
    assert hash(resolved) == hash(cfg.compression.for_compression(64, 10)) and resolved != cfg.compression
    again = EngineConfig.from_kwargs(**json.loads(json.dumps(cfg.to_dict())))  # as a tensor-parallel follower gets it
    assert again == cfg


def test_app_config_sections(qwen3_path):
    pytest.importorskip("ray")
    from zipserve.cluster.app import load_app_config, resolve_config

    app, engine = load_app_config({"model": qwen3_path, "engine": {"block_size": 16}, "workers": {"autoscaling": {
        "min_replicas": 1, "max_replicas": 3, "target_pressure": 0.5}}, "routing": None})
    auto = app.workers.autoscaling.ray_config()
    assert auto["max_replicas"] == 3 and auto["policy"]["policy_kwargs"] == {"target_pressure": 0.5}
    assert app.ingress.max_concurrent_requests == 256 and app.routing.router_kwargs() == {} and engine.block_size == 16
    assert resolve_config({"model": qwen3_path, "workers": {"num_cpus": 2}})["workers"] == {"num_cpus": 2}
    for bad, needle in [({"workers": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}, "max_replicas"),
                        ({"workers": {"autoscaling": {"policy": {}}}}, "unknown workers.autoscaling key.*policy"),
                        ({"ingress": {"retry_after_s": 0.5}}, "retry_after_s"),
                        ({"routing": {"balance_s": -1}}, "balance_s")]:
        with pytest.raises(ValueError, match=needle):
            load_app_config(dict(bad, model=qwen3_path))


def test_batch_rows_are_refused_with_a_reason(tmp_path):
    from zipserve.cluster.batch import BatchRow, read_rows

    lines = [{"id": 1, "prompt": [5, 6], "seed": 3}, {"prompt": [5]}, {"id": "a", "prompt": [5], "colour": "red"},
             {"id": "b"}, {"id": "c", "prompt": [5, -1]}, {"id": "d", "prompt": "x", "n": 17},
             {"id": "e", "prompt": "x", "temperature": -1}, {"id": 1, "prompt": "again"},
             {"id": "f", "messages": [{"role": "user", "content": "hi", "name": "bob"}]}, [1, 2]]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    good, errors = read_rows(str(path), done=set())
    assert [g["id"] for g in good] == ["1", "f"]
    reasons = [e["error"] for e in errors]
    for want, got in zip(["missing id", "unknown field(s): colour; known: ", "exactly one of prompt or messages",
                          "prompt.token ids.1", "n: ", "temperature must be >= 0", "duplicate id '1'",
                          "valid dictionary"], reasons, strict=True):
        assert want in got, (want, got)
    row = BatchRow.model_validate_json(good[1]["request"])  # what an engine actor gets
    assert row.messages[0].model_dump() == {"role": "user", "content": "hi", "name": "bob"}
    assert BatchRow.model_validate_json(good[0]["request"]).sampling_params() == {"seed": 3}


def test_responses_parse_with_the_openai_sdk():
    openai = pytest.importorskip("openai")
    from zipserve.cluster import openai_api as oa

    use = oa.usage(10, 3, 2)
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    chat = oa.ChatCompletion(id="chatcmpl-1", created=1, model="m", usage=use, choices=[oa.ChatChoice(
        index=0, message=oa.ChatCompletionMessage(content=None, tool_calls=calls), finish_reason="tool_calls")])
    got = openai.types.chat.ChatCompletion.model_validate_json(chat.model_dump_json())
    assert got.choices[0].message.tool_calls[0].function.name == "f"
    assert got.usage.prompt_tokens_details.cached_tokens == 2
    assert "reasoning_content" not in json.loads(chat.model_dump_json())["choices"][0]["message"]
    done = oa.Completion(id="cmpl-1", created=1, model="m", usage=use,
                         choices=[oa.CompletionChoice(index=0, text="hi", finish_reason="length")])
    assert openai.types.Completion.model_validate_json(done.model_dump_json()).choices[0].text == "hi"
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    chunks = [oa.CHAT_CHUNK.dump_json(oa.chat_chunk("c", 1, "m", 0, {"role": "assistant", "content": ""}, None)),
              oa.CHAT_CHUNK.dump_json(oa.chat_chunk("c", 1, "m", 0, {"tool_calls": [call]}, None)),
              oa.CHAT_CHUNK.dump_json(oa.chat_chunk("c", 1, "m", 0, {"content": "é"}, "stop", use)),
              oa.CHAT_CHUNK.dump_json(oa.chat_chunk("c", 1, "m", -1, {}, None, use))]
    parsed = [openai.types.chat.ChatCompletionChunk.model_validate_json(c) for c in chunks]
    assert parsed[1].choices[0].delta.tool_calls[0].function.name == "f"
    assert parsed[2].choices[0].delta.content == "é"
    assert parsed[3].choices == [] and parsed[3].usage.total_tokens == 13
    text = oa.COMPLETION_CHUNK.dump_json(oa.completion_chunk("c", 1, "m", 0, "x", "length"))
    assert openai.types.Completion.model_validate_json(text).choices[0].finish_reason == "length"
    models = oa.ModelList(data=[oa.ModelCard(id="tiny", max_model_len=256)]).model_dump_json()
    assert openai.types.Model.model_validate(json.loads(models)["data"][0]).id == "tiny"
    assert json.loads(oa.APIError(404, "no", param="model", code="model_not_found").body().model_dump_json()) == \
        {"error": {"message": "no", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}


def test_kv_recall_pages_reaches_the_engine_params():
    """The HTTP field becomes the engine's per-request recall_pages (the engine checks it: tests/test_recall.py)."""
    from zipserve.cluster.openai_api import CompletionRequest
    from zipserve.workers import SamplingParams

    for asked in (None, 0, 3):
        fields = CompletionRequest(model="m", prompt="x", kv_recall_pages=asked).sampling_params(8)
        assert SamplingParams(**fields).recall_pages == asked
