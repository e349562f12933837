"""The engine with backend="triton" equals backend="torch" (on CPU the kernels run in the interpreter)."""

import pytest

from workers import LLM, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [(j * 7) % 200 + 3 for j in range(29)]]


@pytest.mark.parametrize("budget", [None, 2])
def test_triton_backend_matches_torch_backend(qwen3_path, budget):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    common = dict(block_size=8, budget_blocks=budget, compression=dict(query_window=4), max_num_batched_tokens=16,
                  num_blocks=48, dtype="float32")
    ref = LLM(qwen3_path, backend="torch", **common)
    tri = LLM(qwen3_path, backend="triton", **common)
    assert [o.token_ids for o in tri.generate(PROMPTS, params, use_tqdm=False)] == \
           [o.token_ids for o in ref.generate(PROMPTS, params, use_tqdm=False)]
    if budget is not None:
        assert tri.stats()["compressions"] == ref.stats()["compressions"] > 0
