"""Tensor parallelism on CPU (gloo): TP=N gives TP=1's tokens, with and without compression."""

import pytest
import torch

from zipserve.workers import LLM, SamplingParams
from zipserve.workers.models.loader import shard_tensor
from zipserve.workers.models.random_folder import build_model_folder
from zipserve.workers.parallel import TPGroup

PROMPTS = [[(5 * i + 3) % 250 + 3 for i in range(40)], [7, 9, 11, 13] * 9, list(range(20, 90))]
CFG = dict(block_size=16, max_model_len=256, max_num_seqs=4)


def _generate(path, params, **kw):
    llm = LLM(path, **CFG, **kw)
    try:
        return [list(o.token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)], llm.stats()
    finally:
        if hasattr(llm.engine, "shutdown"):
            llm.engine.shutdown()


@pytest.mark.parametrize("engine", [{}, {"budget_blocks": 2, "compression": {"query_window": 8}}],
                         ids=["full-kv", "compressed"])
def test_tp2_equals_tp1_greedy_and_seeded_sampling(qwen3_path, engine):
    for params in (SamplingParams(temperature=0, max_tokens=70, ignore_eos=True),
                   SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=40, ignore_eos=True)):
        want, stats1 = _generate(qwen3_path, params, **engine)
        got, stats2 = _generate(qwen3_path, params, tensor_parallel_size=2, **engine)
        assert got == want
        assert stats2.get("compressions", 0) == stats1.get("compressions", 0)
    if engine:
        assert stats1["compressions"] > 0  # the compressed run did compress (per rank, on its own KV heads)


def test_tp2_equals_tp1_with_grammars_bad_words_and_logprobs(qwen3_path):
    """Ranks step in lockstep: a grammar compiled on each rank's thread must admit its request at the same
    step everywhere (the engine waits for it under TP)."""
    schema = {"type": "object", "required": ["n"], "additionalProperties": False,
              "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}}}
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=40, logprobs=2, bad_words=["7"],
                            structured={"json": schema, "disable_any_whitespace": True})
    want, _ = _generate(qwen3_path, params)
    assert _generate(qwen3_path, params, tensor_parallel_size=2)[0] == want


def test_tp3_pads_the_vocabulary_shards_and_still_matches(tmp_path):
    """320 tokens over 3 ranks: the last vocabulary shard is zero-padded and the padding trimmed."""
    path = build_model_folder(str(tmp_path), "qwen3", heads=6, kv_heads=3)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    assert _generate(path, params, tensor_parallel_size=3)[0] == _generate(path, params)[0]


def test_indivisible_heads_are_refused_before_any_process_starts(qwen3_path):
    with pytest.raises(ValueError, match="must divide the model's num_attention_heads"):
        LLM(qwen3_path, **CFG, tensor_parallel_size=3)


def test_shard_tensor_splits_rows_columns_and_vocab():
    t = torch.arange(24.0).view(6, 4)
    tp = TPGroup(rank=1, size=2)
    assert torch.equal(shard_tensor("layers.0.self_attn.qkv_proj.weight", t, tp), t[3:])
    assert torch.equal(shard_tensor("layers.0.mlp.down_proj.weight", t, tp), t[:, 2:])
    assert torch.equal(shard_tensor("layers.0.self_attn.o_proj.bias", t[0], tp), torch.zeros(4))  # rank 0 adds it
    assert torch.equal(shard_tensor("layers.0.input_layernorm.weight", t[0], tp), t[0])
    v = torch.arange(5.0)[:, None].expand(5, 2)
    piece = shard_tensor("lm_head.weight", v, tp)  # 3 rows a rank: rows 3 and 4, then one zero row of padding
    assert torch.equal(piece, torch.tensor([[3.0, 3.0], [4.0, 4.0], [0.0, 0.0]]))


@pytest.mark.parametrize("host", ["thread", "process"])
def test_the_serving_step_loop_hosts_a_tensor_parallel_engine(qwen3_path, host):
    """AsyncEngine (what a Serve worker replica runs) with TP=2, its loop in a thread or its own process:
    streamed tokens equal TP=1's, and shutting it down stops the other rank."""
    import asyncio

    from zipserve.workers.async_engine import AsyncEngine
    from zipserve.workers.config import EngineConfig

    engine = dict(CFG, budget_blocks=2, compression={"query_window": 8})
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    want = [list(o.token_ids) for o in LLM(qwen3_path, **engine).generate(PROMPTS[:2], params, use_tqdm=False)]
    eng = AsyncEngine(EngineConfig.from_kwargs(qwen3_path, tensor_parallel_size=2, **engine),
                      separate_process=host == "process")

    async def one(rid, prompt):
        toks = []
        async for _, out in eng.generate(rid, prompt, params, 1):
            toks.extend(out.new_token_ids)
        return toks

    async def both():
        return await asyncio.gather(one("a", PROMPTS[0]), one("b", PROMPTS[1]))

    try:
        assert asyncio.run(both()) == want
    finally:
        eng.shutdown()
    import torch.distributed as dist

    assert not dist.is_initialized()  # the thread host closed its rank-0 group (a process host never had one here)


def test_serve_app_and_batch_job_run_a_tensor_parallel_worker(qwen3_path, tmp_path, local_ray):
    """The Serve app (router, ingress, one TP=2 worker replica) answers over HTTP what TP=1 generates, and a
    batch job on a TP=2 engine actor writes TP=1's tokens; each engine is one actor (CPU here)."""
    pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    import json

    import httpx
    from ray import serve

    from zipserve.cluster.app import build_app, gpus_per_engine
    from zipserve.cluster.batch import run as run_batch

    assert gpus_per_engine(1, {"tensor_parallel_size": 4}) == 4 and gpus_per_engine(0, {"tensor_parallel_size": 4}) == 0
    engine = dict(CFG, budget_blocks=2, compression={"query_window": 8})
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    outs = LLM(qwen3_path, **engine).generate(PROMPTS, params, use_tqdm=False)
    want, want_text = [list(o.token_ids) for o in outs], [o.text for o in outs]
    assert len(set(want_text)) == 3
    with local_ray(num_cpus=3, serve=True) as port:
        serve.run(build_app({"model": qwen3_path, "model_name": "tiny", "engine": dict(engine, tensor_parallel_size=2),
                             "workers": {"num_replicas": 1, "num_cpus": 0}}), name="tp", route_prefix="/")
        for prompt, text in zip(PROMPTS, want_text):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                           json={"model": "tiny", "prompt": prompt, "max_tokens": 30, "temperature": 0,
                                 "ignore_eos": True})
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            assert usage["completion_tokens"] == 30 and usage["prompt_tokens"] == len(prompt)
            assert r.json()["choices"][0]["text"] == text
        stats = serve.get_deployment_handle("EngineWorker", app_name="tp").stats.remote().result(timeout_s=30)
        assert stats["generated_tokens"] >= 3 * 30  # one replica, one state for the router
        serve.delete("tp")

        rows = [{"id": f"r{i}", "prompt": p, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
                for i, p in enumerate(PROMPTS)]
        with open(tmp_path / "in.jsonl", "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        summary = run_batch(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), model=qwen3_path,
                            engine=dict(engine, tensor_parallel_size=2), num_cpus=1, batch_size=8, progress=False)
        with open(tmp_path / "out.jsonl") as f:
            got = {o["id"]: o["choices"][0]["token_ids"] for o in map(json.loads, f)}
        assert summary["output_rows"] == 3 and got == {f"r{i}": t for i, t in enumerate(want)}


def test_a_dead_follower_fails_the_engine_at_once_naming_the_rank(qwen3_path):
    """A follower killed mid-generation: the next steps raise FollowerDiedError naming rank 1 within seconds
    (not a transport error, not a stall), and every later step does too."""
    import os
    import signal
    import time

    from zipserve.workers.config import EngineConfig
    from zipserve.workers.tensor_parallel import FollowerDiedError, make_engine

    eng = make_engine(EngineConfig.from_kwargs(qwen3_path, **CFG, tensor_parallel_size=2))
    try:
        eng.add_request("a", PROMPTS[0], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        for _ in range(3):
            eng.step()
        os.kill(eng.followers[0].pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(FollowerDiedError, match=r"rank 1 \(exit -9\)"):
            for _ in range(1000):  # (a step may still complete before the kill lands)
                eng.step()
        assert time.monotonic() - t0 < 30
        with pytest.raises(FollowerDiedError):
            eng.step()
    finally:
        eng.shutdown()
