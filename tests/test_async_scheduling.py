"""Async scheduling (workers/engine.py) against the synchronous engine: the same outputs, request for request.

Under async scheduling a step's tokens stay on the device until the next step is launched, so a request
that ends by a token's value (stop token, stop string, EOS) is known one step late and computes one token
too many, which must be dropped; everything a client sees must be what the synchronous engine gives.
Every run checks the engine's page and request invariants after each step (tests/engine_driver.py).
"""

import pytest

from tests.engine_driver import run_checked
from zipserve.workers import LLM, SamplingParams

PROMPTS = [
    [7, 8, 9, 10, 11] * 9,
    [3, 4, 5],
    list(range(20, 90)),
    [100 + (i * 7) % 150 for i in range(33)],
    [42] * 17,
    [7, 8, 9, 10, 11] * 9 + [60, 61],  # shares the first's prefix pages
]


def _outputs(llm, prompts, params, arrive_at=None):
    outs = run_checked(llm, prompts, params, arrive_at=arrive_at)
    return [(list(o.token_ids), o.text, o.finish_reason, o.stop_reason) for o in outs]


def _both(path, prompts, params, arrive_at=None, **cfg):
    sync = _outputs(LLM(path, async_scheduling=False, **cfg), prompts, params, arrive_at)
    llm = LLM(path, async_scheduling=True, **cfg)
    got = _outputs(llm, prompts, params, arrive_at)
    return sync, got, llm


def _stop_params(path, prompts, **cfg):
    """Per prompt: a stop token that greedy decoding reaches after a few tokens (so requests end by value
    at different steps), or a stop string, or max_tokens."""
    free = LLM(path, async_scheduling=False, **cfg).generate(
        prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    params = []
    for i, out in enumerate(free):
        ids = list(out.token_ids)
        if i % 3 == 0:
            params.append(SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[ids[5 + i]]))
        elif i % 3 == 1 and len(out.text) > 12:
            params.append(SamplingParams(temperature=0, max_tokens=40, stop=[out.text[8:11]]))
        else:
            params.append(SamplingParams(temperature=0, max_tokens=13 + i, ignore_eos=True))
    return params


@pytest.mark.parametrize("pool", [64, 14])  # 14 pages of 16: requests are preempted and recomputed
def test_finishes_by_value_match_the_synchronous_engine(model_factory, pool):
    path = model_factory("qwen3", heads=4, kv_heads=2)
    cfg = dict(block_size=16, max_num_batched_tokens=48, num_blocks=pool)
    params = _stop_params(path, PROMPTS, **cfg)
    sync, got, llm = _both(path, PROMPTS, params, arrive_at=[0, 0, 2, 3, 3, 9], **cfg)
    assert got == sync
    reasons = [r for _, _, r, _ in got]
    assert reasons.count("stop") >= 3 and "length" in reasons  # both kinds of ending were exercised
    assert sum(isinstance(s, str) for *_, s in got) >= 1  # a stop string too
    if pool == 14:
        assert llm.engine.stats()["preemptions"] > 0
    assert llm.engine.stats()["used_pages"] == 0 and not llm.engine.has_unfinished_requests()


def test_compressed_engine_matches_the_synchronous_engine(model_factory):
    path = model_factory("qwen3", heads=4, kv_heads=2)
    cfg = dict(block_size=8, max_num_batched_tokens=64, num_blocks=40, budget_blocks=3, compression={"query_window": 4})
    params = _stop_params(path, PROMPTS, **cfg)
    params = [SamplingParams(temperature=0, max_tokens=60, stop_token_ids=p.stop_token_ids, stop=p.stop)
              for p in params]  # long enough to compress several times
    sync, got, llm = _both(path, PROMPTS, params, **cfg)
    assert got == sync
    assert llm.engine.stats()["compressions"] > 0


def test_seeded_sampling_matches_the_synchronous_engine(model_factory):
    path = model_factory("qwen3", heads=4, kv_heads=2)
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i, max_tokens=30, stop_token_ids=[5, 17])
              for i in range(len(PROMPTS))]
    sync, got, _ = _both(path, PROMPTS, params, block_size=16, num_blocks=64)
    assert got == sync


def test_logprobs_requests_keep_the_overlap_and_match_the_synchronous_engine(model_factory):
    path = model_factory("qwen3", heads=4, kv_heads=2)
    params = [SamplingParams(temperature=0 if i != 2 else 0.8, seed=5, max_tokens=12, ignore_eos=True,
                             logprobs=[None, 2, 0, 5][i]) for i in range(4)]
    llm = LLM(path, block_size=16, num_blocks=64)
    outs = llm.generate(PROMPTS[:4], params, use_tqdm=False)
    ref = LLM(path, block_size=16, num_blocks=64, async_scheduling=False).generate(PROMPTS[:4], params, use_tqdm=False)
    assert [list(o.token_ids) for o in outs] == [list(o.token_ids) for o in ref]
    assert outs[0].logprobs is None
    for o, r, n in zip(outs[1:], ref[1:], (2, 0, 5)):
        assert len(o.logprobs) == 12
        for tok, lp, want in zip(o.token_ids, o.logprobs, r.logprobs):
            assert next(iter(lp)) == tok and set(lp) == set(want) and len(lp) in (n, n + 1)
            assert all(abs(lp[t] - want[t]) < 1e-5 for t in lp)
    eng = llm.engine  # a step with logprobs leaves its tokens (and logprobs) on the device
    eng.add_request("x", [3, 4, 5], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3))
    assert eng.step() == [] and eng.requests["x"].num_pending == 1
    out = eng.step()
    assert len(out) == 1 and len(out[0].logprobs) == 1 and len(out[0].logprobs[0]) in (3, 4)


def test_a_sampled_token_stays_on_the_device_until_the_next_step(model_factory):
    path = model_factory("qwen3", heads=4, kv_heads=2)
    eng = LLM(path, block_size=16, num_blocks=64).engine
    eng.add_request("a", [3, 4, 5], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    eng.add_request("b", [6, 7, 8, 9], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    a, b = eng.requests["a"], eng.requests["b"]
    assert eng.step() == []  # prefill: the first tokens are sampled but not yet on the host
    assert (a.num_pending, a.num_tokens, len(a.token_ids)) == (1, 4, 3)
    first = eng.step()  # runs the second tokens (inputs read on the device), returns the first ones
    assert [o.request_id for o in first] == ["a", "b"] and all(len(o.new_token_ids) == 1 for o in first)
    assert a.num_pending == 1 and len(a.token_ids) == 4
    eng.step()  # a samples its last token: it ends now (by length), before its value is known
    assert a.is_finished and eng.stats()["running"] == 1 and "a" in eng.requests
    out = {o.request_id: o for o in eng.step()}
    assert out["a"].finished and out["a"].finish_reason == "length" and len(out["a"].token_ids) == 3
    assert "a" not in eng.requests


def test_abort_while_a_token_is_pending(model_factory):
    path = model_factory("qwen3", heads=4, kv_heads=2)
    llm = LLM(path, block_size=16, num_blocks=64)
    eng = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    eng.add_request("gone", [3, 4, 5], greedy)
    eng.add_request("kept", [6, 7, 8], greedy)
    eng.step()
    eng.step()
    assert eng.requests["gone"].num_pending == 1
    assert eng.abort_request("gone") is True
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
        eng.check_invariants()
    assert {o.request_id for o in outs} == {"kept"}  # nothing more for the aborted request
    ref = LLM(path, block_size=16, num_blocks=64, async_scheduling=False).generate([[6, 7, 8]], greedy, use_tqdm=False)
    assert [o for o in outs if o.finished][0].token_ids == ref[0].token_ids
    assert eng.stats()["used_pages"] == 0 and eng.abort_request("gone") is False
