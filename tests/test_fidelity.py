"""benchmarks/quality/fidelity.py: the teacher-forced replay against full KV (tiny model, CPU)."""

from benchmarks.quality.fidelity import replay
from workers import LLM, SamplingParams

CFG = dict(block_size=16, max_model_len=512, max_num_seqs=4)
PROMPTS = [[(5 * i + 3) % 250 + 3 for i in range(40)], [7, 9, 11, 13] * 9]


def _reference(llm, n):
    return [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                                              use_tqdm=False)]


def test_a_budget_that_never_compresses_agrees_everywhere(qwen3_path):
    full = LLM(qwen3_path, **CFG)
    ref = _reference(full, 120)
    roomy = LLM(qwen3_path, budget_blocks=16, **CFG)  # 16 pages of 16 > 40 + 120 tokens: no compression
    m = replay(full, roomy, PROMPTS, ref)
    assert m["compressions"] == 0 and m["all"]["positions"] == 2 * 120 and m["after"]["positions"] == 0
    assert m["all"]["top1_agreement"] == 1.0 and m["all"]["mean_kl"] < 1e-6 and abs(m["all"]["nll_increase"]) < 1e-5


def test_a_small_budget_compresses_and_costs_fidelity_after_the_first_compression(qwen3_path):
    full = LLM(qwen3_path, **CFG)
    ref = _reference(full, 150)
    small = LLM(qwen3_path, budget_blocks=2, compression={"query_window": 8}, **CFG)
    m = replay(full, small, PROMPTS, ref)  # raises if either engine's output is not the reference
    assert m["compressions"] > 0 and 0 < m["after"]["positions"] < m["all"]["positions"] == 2 * 150
    assert 0 <= m["after"]["top1_agreement"] <= 1 and m["after"]["mean_kl"] > 1e-4
    # Before any compression both caches are identical: all the divergence is after the first one.
    before_kl = m["all"]["mean_kl"] * m["all"]["positions"] - m["after"]["mean_kl"] * m["after"]["positions"]
    assert abs(before_kl) < 1e-4
