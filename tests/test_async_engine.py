"""AsyncEngine (the step loop behind a worker) without Ray: streaming, n samples sharing prompt pages,
cancellation freeing pages, and an engine failure reaching every waiting request."""

import asyncio

import pytest

from workers import LLM, SamplingParams
from workers.async_engine import AsyncEngine, EngineDeadError
from workers.config import EngineConfig

CFG = dict(block_size=16, num_blocks=128, max_model_len=256, max_num_seqs=8, budget_blocks=4,
           compression={"query_window": 8})
PROMPT = [(7 * i) % 200 + 3 for i in range(70)]  # 4 full pages + a partial one


def _collect(engine, rid, prompt, params, n=1):
    async def run():
        outs = {}
        async for i, out in engine.generate(rid, prompt, params, n):
            outs.setdefault(i, []).extend(out.new_token_ids)
        return outs

    return asyncio.run(run())


@pytest.fixture
def engine(qwen3_path):
    eng = AsyncEngine(EngineConfig.from_kwargs(qwen3_path, **CFG))
    yield eng
    eng.shutdown()


def test_stream_equals_offline_and_n_samples_share_the_prompt(engine, qwen3_path):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = LLM(qwen3_path, **CFG).generate([PROMPT], params, use_tqdm=False)[0].token_ids
    assert _collect(engine, "a", PROMPT, params) == {0: want}
    before = engine.snapshot["stats"]["prefix_cache_hits"]
    outs = _collect(engine, "b", PROMPT, params, n=3)
    assert outs == {0: want, 1: want, 2: want}
    # Samples 1 and 2 were admitted after sample 0 cached the prompt: each hit its 4 full pages.
    assert engine.snapshot["stats"]["prefix_cache_hits"] - before >= 4 + 2 * 4


def test_cancelled_generation_frees_pages(engine):
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def run():
        agen = engine.generate("c", PROMPT, params)
        async for _ in agen:
            break
        await agen.aclose()  # what a disconnecting client does

    asyncio.run(run())
    for _ in range(200):
        s = engine.snapshot["stats"]
        if s["running"] == 0 and s["free_pages"] == s["total_pages"]:
            break
        asyncio.run(asyncio.sleep(0.02))
    assert s["running"] == 0 and s["free_pages"] == s["total_pages"], s
    assert s["generated_tokens"] < 200


def test_engine_failure_reaches_waiting_requests(engine):
    def broken():
        raise RuntimeError("device lost")

    engine.engine.step = broken
    with pytest.raises(EngineDeadError, match="device lost"):
        _collect(engine, "d", PROMPT, SamplingParams(max_tokens=5))
    assert not engine.alive
    with pytest.raises(EngineDeadError):
        _collect(engine, "e", PROMPT, SamplingParams(max_tokens=5))


def test_bad_request_is_refused_before_queueing(engine):
    with pytest.raises(ValueError, match="prompt has"):
        _collect(engine, "f", [5] * 300, SamplingParams(max_tokens=5))
    assert engine.snapshot["stats"]["waiting"] == 0
