"""Greedy token-for-token parity with transformers on tiny random Qwen3 / Qwen2 / Llama models."""

import pytest

from tests.hf_oracle import hf_greedy
from zipserve.workers import LLM, SamplingParams

# Mixed lengths crossing several 16-token pages; with max_num_batched_tokens=24 every prompt longer
# than 24 tokens is prefilled in chunks, mixed with other requests' decode tokens.
PROMPTS = [
    [7, 8, 9, 10, 11] * 9,  # 45 tokens
    [3, 4, 5],
    list(range(20, 90)),  # 70 tokens
    [100 + (i * 7) % 150 for i in range(33)],
    [42] * 17,
]

VARIANTS = {
    "qwen3-gqa": ("qwen3", dict(heads=4, kv_heads=2)),
    "qwen3-tied-mha": ("qwen3", dict(heads=4, kv_heads=4, tie=True)),
    "qwen3-gqa4-yarn": ("qwen3", dict(heads=8, kv_heads=2, hidden=64, head_dim=8,
                                      rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256})),
    "qwen2-gqa": ("qwen2", dict(heads=4, kv_heads=2)),
    "qwen2-tied-linear": ("qwen2", dict(heads=4, kv_heads=1, tie=True, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama-gqa": ("llama", dict(heads=4, kv_heads=2)),
    "llama-tied-llama3-bias": ("llama", dict(heads=4, kv_heads=2, tie=True, attention_bias=True, mlp_bias=True,
                                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_matches_transformers(model_factory, variant):
    arch, kw = VARIANTS[variant]
    path = model_factory(arch, **kw)
    expected = hf_greedy(path, PROMPTS, max_new_tokens=40)
    llm = LLM(path, block_size=16, max_num_batched_tokens=24, num_blocks=64)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    for out, exp, prompt in zip(outs, expected, PROMPTS):
        assert out.token_ids == exp, f"{variant}: prompt of {len(prompt)} tokens diverged"
        assert out.finish_reason == "length" and out.num_prompt_tokens == len(prompt)
    # Outputs are meaningful: not one token repeated everywhere.
    assert len({t for o in outs for t in o.token_ids}) > 10


def test_one_request_per_step_equals_batched(qwen3_path):
    """Batch composition must not change greedy results (no cross-request leakage in attention)."""
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    batched = LLM(qwen3_path, block_size=16, max_num_batched_tokens=512).generate(PROMPTS, p, use_tqdm=False)
    single = LLM(qwen3_path, block_size=16, max_num_seqs=1, max_num_batched_tokens=7).generate(PROMPTS, p, use_tqdm=False)
    assert [o.token_ids for o in batched] == [o.token_ids for o in single]


def test_logprobs_match_transformers(qwen3_path):
    import torch
    from transformers import AutoModelForCausalLM

    prompt = PROMPTS[0]
    out = LLM(qwen3_path, block_size=16).generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3), use_tqdm=False)[0]
    model = AutoModelForCausalLM.from_pretrained(qwen3_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.token_ids])).logits[0].float()
    ref = logits.log_softmax(-1)[len(prompt) - 1 : -1]
    assert len(out.logprobs) == 8
    for step, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert list(lp)[0] == tok and len(lp) <= 4
        top = ref[step].topk(3)
        assert set(top.indices.tolist()) <= set(lp)
        for t, v in lp.items():
            assert v == pytest.approx(ref[step, t].item(), abs=1e-4)


@pytest.mark.parametrize("chunk", [7, 512])  # chunked prefill (and a long prompt compressed at its end) or whole
def test_prompt_logprobs_match_transformers(qwen3_path, chunk):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qwen3_path, dtype=torch.float32).eval()
    llm = LLM(qwen3_path, block_size=8, max_num_batched_tokens=chunk, budget_blocks=3, compression={"query_window": 4})
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=2)
    prompts = [PROMPTS[0], PROMPTS[0], list(range(3, 60))]  # the second would be a prefix-cache hit
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        with torch.no_grad():
            ref = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
        assert len(out.prompt_logprobs) == len(prompt) - 1
        for pos, lp in enumerate(out.prompt_logprobs):  # position pos + 1, scored from the tokens before it
            tok = prompt[pos + 1]
            assert next(iter(lp)) == tok and set(ref[pos].topk(2).indices.tolist()) <= set(lp) and len(lp) <= 3
            assert all(v == pytest.approx(ref[pos, t].item(), abs=1e-4) for t, v in lp.items())
    assert llm.engine.stats()["prefix_cache_hits"] == 0


def test_stale_cache_contents_never_leak(qwen3_path):
    """Pages are reused without clearing: poison the whole pool with NaN and outputs must not change."""
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    llm = LLM(qwen3_path, block_size=16, num_blocks=32, max_num_batched_tokens=24)
    llm.engine.runner.kv_cache.fill_(float("nan"))
    assert [o.token_ids for o in llm.generate(PROMPTS, p, use_tqdm=False)] == hf_greedy(qwen3_path, PROMPTS, 20)
