"""Preemption by recompute under a tiny page pool yields the same greedy outputs."""

from tests.hf_oracle import hf_greedy
from tests.engine_driver import run_checked
from zipserve.workers import LLM, SamplingParams

PROMPTS = [[(i * 13 + j) % 250 + 3 for j in range(20 + 9 * i)] for i in range(6)]


def test_preemption_same_outputs(model_factory):
    path = model_factory("llama", heads=4, kv_heads=2)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    llm = LLM(path, block_size=16, num_blocks=14, max_num_batched_tokens=32)  # 224 tokens for ~500 needed
    outs = run_checked(llm, PROMPTS, params, _tables_cover_cache)
    assert llm.stats()["preemptions"] > 0
    assert [o.token_ids for o in outs] == hf_greedy(path, PROMPTS, 48)
    assert llm.stats()["free_pages"] == 14


def test_preemption_with_prefix_cache_off(model_factory):
    path = model_factory("llama", heads=4, kv_heads=2)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    llm = LLM(path, block_size=8, num_blocks=20, max_num_batched_tokens=16, enable_prefix_cache=False)
    outs = run_checked(llm, PROMPTS, params, _tables_cover_cache)
    assert llm.stats()["preemptions"] > 0
    assert [o.token_ids for o in outs] == hf_greedy(path, PROMPTS, 30)


def _tables_cover_cache(eng):
    for s in eng.scheduler.running:
        assert len(s.block_table) * eng.config.block_size >= s.num_computed_tokens


def test_prefill_tokens_count_every_prompt_token_once_and_recomputes_again(model_factory):
    """The engine's prefill counter (what the throughput benchmark tells prefill steps by): each prompt token
    once, in whatever chunks it ran (the last one samples), plus what a preemption makes it recompute."""
    path = model_factory("llama", heads=4, kv_heads=2)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    roomy = LLM(path, block_size=8, num_blocks=200, max_num_batched_tokens=16, enable_prefix_cache=False)
    roomy.generate(PROMPTS, params, use_tqdm=False)
    assert roomy.stats()["preemptions"] == 0
    assert roomy.engine.num_prefill_tokens_computed == sum(len(p) for p in PROMPTS)
    tight = LLM(path, block_size=8, num_blocks=20, max_num_batched_tokens=16, enable_prefix_cache=False)
    tight.generate(PROMPTS, params, use_tqdm=False)
    assert tight.stats()["preemptions"] > 0
    assert tight.engine.num_prefill_tokens_computed > sum(len(p) for p in PROMPTS)
