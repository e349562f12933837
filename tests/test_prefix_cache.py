"""Prefix caching: shared prompt pages are reused (counters rise) and outputs do not change."""

from zipserve.workers import LLM, SamplingParams

SYSTEM = list(range(30, 30 + 40))  # 40 tokens = 2 full 16-token pages + 8
PROMPTS = [SYSTEM + [200 + i, 201 + i, 202] for i in range(4)]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def test_shared_prefix_hits_and_same_outputs(qwen3_path):
    off = LLM(qwen3_path, block_size=16, enable_prefix_cache=False).generate(PROMPTS, GREEDY, use_tqdm=False)
    llm = LLM(qwen3_path, block_size=16)
    first = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    s0 = llm.stats()
    rest = llm.generate(PROMPTS[1:], GREEDY, use_tqdm=False)
    s1 = llm.stats()
    assert s0["prefix_cache_hits"] == 0
    # Each later request finds the two full system-prompt pages cached.
    assert s1["prefix_cache_hits"] - s0["prefix_cache_hits"] == 3 * 32
    assert all(o.num_cached_tokens == 32 for o in rest)
    assert [o.token_ids for o in first + rest] == [o.token_ids for o in off]
    assert s1["prefix_cache_queries"] == sum(len(p) for p in PROMPTS)


def test_generated_pages_are_cached(qwen3_path):
    """A follow-up turn whose prompt is the previous prompt + answer hits the generated pages too."""
    llm = LLM(qwen3_path, block_size=16)
    prompt = PROMPTS[0]
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    follow = prompt + out.token_ids + [5, 6, 7]
    ref = LLM(qwen3_path, block_size=16, enable_prefix_cache=False).generate([follow], GREEDY, use_tqdm=False)[0]
    again = llm.generate([follow], GREEDY, use_tqdm=False)[0]
    computed_pages = (len(prompt) + len(out.token_ids) - 1) // 16  # the last token's K/V never got computed
    assert again.num_cached_tokens == computed_pages * 16 > len(prompt)
    assert again.token_ids == ref.token_ids


def test_identical_prompt_leaves_last_token_to_compute(qwen3_path):
    llm = LLM(qwen3_path, block_size=16)
    prompt = list(range(10, 10 + 48))  # exactly 3 pages
    a = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    b = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert b.num_cached_tokens == 32  # the third page holds the last token, which must run
    assert a.token_ids == b.token_ids


def test_cached_pages_are_evicted_lru_under_pressure(qwen3_path):
    llm = LLM(qwen3_path, block_size=16, num_blocks=16)
    a = list(range(10, 10 + 65))
    llm.generate([a], GREEDY, use_tqdm=False)
    # Fill the pool with other work; a's cached pages get evicted, and nothing breaks.
    for i in range(3):
        llm.generate([[i + 1] * 150], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    out = llm.generate([a], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens < 64
    llm.engine.check_invariants()
    assert llm.stats()["free_pages"] == 16
