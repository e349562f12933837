"""Bad input gets a clear exception and leaves the engine usable and unchanged."""

import pytest

from zipserve.workers import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(model_factory):
    return LLM(model_factory("qwen3", max_pos=128), block_size=16, num_blocks=32)


def _assert_still_serves(llm, before):
    assert llm.stats()["free_pages"] == llm.stats()["total_pages"]
    assert llm.stats()["running"] == llm.stats()["waiting"] == 0
    assert llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].token_ids == before


def test_unknown_config_key(qwen3_path):
    with pytest.raises(ValueError, match="unknown engine config key.*blok_size"):
        LLM(qwen3_path, blok_size=16)


def test_missing_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LLM(str(tmp_path))


@pytest.mark.parametrize("bad", [dict(block_size=0), dict(max_num_seqs=-1), dict(num_blocks=1.5), dict(backend="cuda-magic"),
                                 dict(dtype="int8"), dict(max_num_batched_tokens=True)])
def test_bad_config_values(qwen3_path, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        LLM(qwen3_path, **bad)


def test_triton_backend_on_cpu_needs_the_interpreter(qwen3_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        LLM(qwen3_path, backend="triton", device="cpu")


@pytest.mark.parametrize("kw, msg", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-3), "max_tokens"), (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"), (dict(min_p=2), "min_p"),
    (dict(stop=[""]), "stop"), (dict(logprobs=50), "logprobs"), (dict(seed="x"), "seed"),
    (dict(temperature=float("nan")), "temperature"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_bad_sampling_params(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def test_bad_prompts_leave_engine_usable(llm):
    before = llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].token_ids
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([""], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="at most 127 tokens"):
        llm.generate([[1] * 128], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="token ids must be integers"):
        llm.generate([[1, 10**9]], GREEDY, use_tqdm=False)
    # A batch with one bad prompt is refused whole; the good ones queued before it are withdrawn.
    with pytest.raises(ValueError, match="at most"):
        llm.generate([[5, 6, 7], [1] * 500], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="2 prompts but 1"):
        llm.generate([[1], [2]], [GREEDY], use_tqdm=False)
    _assert_still_serves(llm, before)


def test_generation_stops_at_max_model_len(llm):
    out = llm.generate([[3] * 120], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


def test_duplicate_request_id_and_abort(llm):
    eng = llm.engine
    eng.add_request("dup", [1, 2, 3], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("dup", [4, 5], GREEDY)
    eng.step()
    assert eng.stats()["used_pages"] == 1
    assert eng.abort_request("dup") is True
    assert eng.stats()["used_pages"] == 0 and not eng.has_unfinished_requests()
    assert eng.abort_request("dup") is False
