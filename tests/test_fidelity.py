"""benchmarks/quality/fidelity.py: the teacher-forced replay against full KV (tiny model, CPU)."""

from benchmarks.quality.fidelity import replay
from zipserve.workers import LLM, SamplingParams

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


def test_merge_joins_runs_of_one_workload_and_refuses_another(tmp_path):
    import json

    import pytest

    from benchmarks.quality.fidelity import merge, recent_share

    head = dict(benchmark="fidelity", model="M", device="cpu", prompts=4, length=512, block_size=16,
                mean_prompt_tokens=50.0)
    run = dict(budget_fraction=0.25, budget_tokens=144, all=dict(top1_agreement=0.9, mean_kl=0.03))
    paths = []
    for i, label in enumerate(["+global", "+global recent_window=72", "+global recent_fraction=0.75"]):
        paths.append(str(tmp_path / f"{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(dict(head, runs=[dict(run, setting=label)]), f)
    merged = merge(paths, str(tmp_path), "_m")
    assert [recent_share(r) for r in merged["runs"]] == [None, 0.5, 0.75]
    assert (tmp_path / "fidelity_m_512_m.json").exists()
    with open(paths[0], "w") as f:
        json.dump(dict(head, length=256, runs=[dict(run, setting="+global")]), f)
    with pytest.raises(ValueError, match="different workload"):
        merge(paths, str(tmp_path))
