"""AsyncEngine (the step loop behind a worker) without Ray, with its loop in a thread and in its own process:
streaming, n samples sharing prompt pages, cancellation freeing pages, and an engine failure (or a killed
engine process) reaching every waiting request."""

import asyncio
import os
import signal

import pytest

from tests.waiting import wait_until, wait_until_async
from zipserve.workers import LLM, SamplingParams
from zipserve.workers.async_engine import AsyncEngine, EngineDeadError
from zipserve.workers.config import EngineConfig

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


@pytest.fixture(params=["thread", "process"])
def engine(request, qwen3_path):
    eng = AsyncEngine(EngineConfig.from_kwargs(qwen3_path, **CFG), separate_process=request.param == "process")
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

    def idle():
        s = engine.snapshot["stats"]
        return s["running"] == 0 and s["free_pages"] == s["total_pages"] and s

    s = wait_until(idle, timeout=60, interval=0.02, message=lambda: f"every page back: {engine.snapshot['stats']}")
    assert s["generated_tokens"] < 200


def test_engine_failure_reaches_waiting_requests(engine):
    if engine.separate_process:  # the process dies mid-generation (a crash, the OOM killer)
        async def run():
            async for _ in engine.generate("d", PROMPT, SamplingParams(max_tokens=200, ignore_eos=True)):
                os.kill(engine.pid, signal.SIGKILL)

        with pytest.raises(EngineDeadError, match="engine process exited"):
            asyncio.run(run())
    else:
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


def test_outputs_carry_prompt_tokens_text_and_logprobs(engine, qwen3_path):
    """The whole RequestOutput, not only the new tokens, matches the offline engine's."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    want = LLM(qwen3_path, **CFG).generate([PROMPT], params, use_tqdm=False)[0]

    async def run():
        return [out async for _, out in engine.generate("full", PROMPT, params)]

    outs = asyncio.run(run())
    last = outs[-1]
    assert last.finished and last.finish_reason == "length"
    assert list(last.prompt_token_ids) == PROMPT and last.num_prompt_tokens == len(PROMPT)
    assert list(last.token_ids) == want.token_ids and last.text == want.text
    assert len(last.logprobs) == 12 and list(last.logprobs[0]) == list(want.logprobs[0])
    assert all(abs(a[t] - b[t]) < 1e-5 for a, b in zip(last.logprobs, want.logprobs) for t in a)
    assert [len(o.token_ids) for o in outs] == sorted(len(o.token_ids) for o in outs)


def test_a_slow_consumer_gets_merged_outputs_with_every_token_and_character(engine, qwen3_path):
    """Outputs that pile up while a caller is busy arrive merged: fewer messages, same tokens and text.

    The caller is busy until the engine has generated `ahead` tokens past what the caller has received, not
    for a fixed time: on a loaded machine a step can outlast any fixed pause, and then nothing piles up."""
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    want = LLM(qwen3_path, **CFG).generate([PROMPT, PROMPT], params, use_tqdm=False)[0]
    total, ahead = 2 * 48, 8  # 8 tokens = 4 steps of both samples: each merged pair of messages carries >= 6

    def generated() -> int:
        return engine.snapshot["stats"]["generated_tokens"]

    async def run():
        tokens, text, messages, finished = {0: [], 1: []}, {0: "", 1: ""}, 0, []
        before = generated()
        async for i, out in engine.generate("slow", PROMPT, params, n=2):
            messages += 1
            tokens[i] += out.new_token_ids
            text[i] += out.new_text
            if out.finished:
                finished.append(i)
            target = min(len(tokens[0]) + len(tokens[1]) + ahead, total)  # a busy caller; the engine steps on
            await wait_until_async(lambda: generated() - before >= target, timeout=60,
                                   message=f"{target} tokens generated ({messages} messages so far)")
            # The snapshot is published just before its step's outputs are handed to this loop, and those of
            # the steps before it are already queued as callbacks: one turn of the loop puts them in the queue.
            await asyncio.sleep(0)
        return tokens, text, messages, finished

    tokens, text, messages, finished = asyncio.run(run())
    assert tokens == {0: want.token_ids, 1: want.token_ids} and text == {0: want.text, 1: want.text}
    assert sorted(finished) == [0, 1]
    assert messages < 2 * 48 / 2, f"{messages} messages for 96 tokens: nothing was merged"


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_stream_interval_bounds_the_message_rate_and_finishes_at_once(mode, qwen3_path):
    """stream_interval_s: after the first output, outputs are gathered for the interval and handed over merged;
    a finish is handed over at once. Checked without racing the clock (on a loaded machine the caller's own
    stamps lag the generator's by tens of ms, so gaps between them say little):
    - an interval longer than any run here gives exactly two messages: the first output, then all the rest
      with the finish, at once (had the finish waited out the interval, the run would pass its deadline);
    - under a 100 ms interval every paced message is handed over inside the span the caller measures around
      the whole stream, n of them at least 100 ms apart, so (n - 1) x 100 ms <= that span however loaded the
      machine is (load only stretches the span). Unpaced, a message would come every step: 400 of them."""
    cfg = dict(CFG, max_model_len=512)
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    short = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    want, want_short = LLM(qwen3_path, **cfg).generate([PROMPT, PROMPT], [params, short], use_tqdm=False)
    engine = AsyncEngine(EngineConfig.from_kwargs(qwen3_path, **cfg), separate_process=mode == "process")

    async def run(rid, stream_params, interval_s):
        loop = asyncio.get_running_loop()
        t0, stamps, tokens, text = loop.time(), [], [], ""
        async for _, out in engine.generate(rid, PROMPT, stream_params, stream_interval_s=interval_s):
            stamps.append((loop.time() - t0, out.finished))
            tokens += out.new_token_ids
            text += out.new_text
        return stamps, tokens, text, loop.time() - t0

    async def both():
        held = await asyncio.wait_for(run("held", short, 3600.0), timeout=120)
        return held, await asyncio.wait_for(run("paced", params, 0.1), timeout=300)

    try:
        held, paced_run = asyncio.run(both())
    finally:
        engine.shutdown()
    stamps, tokens, text, _ = held
    assert tokens == want_short.token_ids and text == want_short.text
    assert [fin for _, fin in stamps] == [False, True], f"not the first output then the rest at once: {stamps}"
    stamps, tokens, text, span = paced_run
    assert tokens == want.token_ids and text == want.text
    paced = [t for t, fin in stamps if not fin]
    assert len(paced) >= 2 and (len(paced) - 1) * 0.1 <= span + 1e-6, f"closer than the interval: {paced}"
    assert stamps[-1][1]  # the finish ends the stream (at once: the held run above)
    assert len(stamps) < len(tokens), "outputs were not merged"  # (how many depends on the step time vs 100 ms)


def test_merge_waiting_keeps_order_per_request_and_stops_at_an_error():
    from zipserve.workers.async_engine import _merge_waiting
    from zipserve.workers.outputs import RequestOutput

    def out(rid, toks, text, finished=False):
        return RequestOutput(rid, [1], list(toks), text, finished, "length" if finished else None,
                             new_token_ids=list(toks), new_text=text)

    async def run():
        q = asyncio.Queue()
        for item in [out("b", [2], "x"), out("a", [3], "y"), out("b", [4, 5], "zw", True), RuntimeError("dead"),
                     out("a", [6], "v")]:
            q.put_nowait(item)
        merged = _merge_waiting([out("a", [1], "u")], q)
        return merged

    a, b, err = asyncio.run(run())
    assert (a.request_id, a.new_token_ids, a.new_text, a.finished) == ("a", [1, 3], "uy", False)
    assert (b.request_id, b.new_token_ids, b.new_text, b.finished, b.finish_reason) == ("b", [2, 4, 5], "xzw", True, "length")
    assert isinstance(err, RuntimeError)
