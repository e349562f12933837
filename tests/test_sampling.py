"""Sampling: seeded repeatability, support restriction by top-k / top-p / min-p, stop conditions."""

import pytest
import torch

from zipserve.workers import LLM, SamplingParams
from zipserve.workers.sampler import sample, truncate_logits

PROMPTS = [[7, 8, 9, 10, 11] * 5, [3, 4, 5], list(range(40, 70))]


@pytest.fixture(scope="module")
def llm(qwen3_path):
    return LLM(qwen3_path, block_size=16)


def test_seeded_runs_repeat(llm):
    p = [SamplingParams(temperature=1.0, max_tokens=30, seed=s, ignore_eos=True) for s in (1, 2, 1)]
    a = llm.generate(PROMPTS, p, use_tqdm=False)
    # Same seeds, different batch composition and order: identical streams.
    b = llm.generate(PROMPTS[::-1], p[::-1], use_tqdm=False)[::-1]
    c = llm.generate([PROMPTS[0]], p[0], use_tqdm=False)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert a[0].token_ids == c[0].token_ids
    d = llm.generate([PROMPTS[0]], SamplingParams(temperature=1.0, max_tokens=30, seed=2, ignore_eos=True), use_tqdm=False)
    assert d[0].token_ids != a[0].token_ids


def _draws(logits, params, n=4000):
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(logits.shape[-1])
    for _ in range(n):
        tok, _ = sample(logits[None], [params], [None], gen)
        counts[tok[0]] += 1
    return counts / n


def test_top_k_top_p_min_p_restrict_support_and_keep_proportions():
    torch.manual_seed(0)
    logits = torch.randn(12) * 2
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    # top-k: only the k most likely tokens, renormalised.
    freq = _draws(logits, SamplingParams(temperature=1.0, top_k=3))
    allowed = order[:3]
    assert freq[allowed].sum() == 1.0
    expect = probs[allowed] / probs[allowed].sum()
    assert torch.allclose(freq[allowed], expect, atol=0.03)
    # top-p: the smallest set whose mass reaches p.
    p = 0.7
    cum = probs[order].cumsum(0)
    keep = order[: int((cum < p).sum()) + 1]
    freq = _draws(logits, SamplingParams(temperature=1.0, top_p=p))
    assert freq[keep].sum() == 1.0 and (freq[keep] > 0).all()
    # min-p: tokens with prob >= min_p * max prob.
    mp = 0.3
    keep = (probs >= mp * probs.max()).nonzero().flatten()
    freq = _draws(logits, SamplingParams(temperature=1.0, min_p=mp))
    assert freq[keep].sum() == 1.0
    assert torch.allclose(freq[keep], probs[keep] / probs[keep].sum(), atol=0.03)


def test_a_batch_of_rows_draws_each_rows_own_distribution():
    """Batched device-side draws: 3,000 rows of two distributions in one call keep each row's proportions
    (and its own seed: seeded rows repeat whatever shares the batch)."""
    torch.manual_seed(1)
    a, b = torch.randn(10) * 2, torch.randn(10) * 2
    logits = torch.stack([a, b] * 1500)
    params = [SamplingParams(temperature=1.0)] * 3000
    toks, _ = sample(logits, params, [None] * 3000, torch.Generator().manual_seed(0))
    for row0, ref in ((0, a), (1, b)):
        freq = torch.bincount(torch.tensor(toks[row0::2]), minlength=10) / 1500
        assert torch.allclose(freq, ref.softmax(-1), atol=0.04), (freq, ref.softmax(-1))
    seeded = [SamplingParams(temperature=1.0, seed=7)]
    alone, _ = sample(a[None], seeded, [torch.Generator().manual_seed(7)])
    mixed, _ = sample(torch.stack([b, a, b]), [params[0], seeded[0], params[0]],
                      [None, torch.Generator().manual_seed(7), None], torch.Generator().manual_seed(3))
    assert mixed[1] == alone[0]


def test_temperature_sharpens():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    cold = truncate_logits(logits[None], [SamplingParams(temperature=0.25)]).softmax(-1)[0]
    hot = truncate_logits(logits[None], [SamplingParams(temperature=4.0)]).softmax(-1)[0]
    assert cold[0] > logits.softmax(-1)[0] > hot[0]


def test_stop_string_cuts_text(llm):
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = llm.generate([PROMPTS[2]], greedy, use_tqdm=False)[0]
    text = full.text
    assert len(text) > 20
    stop = text[10:14]
    first = text.find(stop)
    out = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop, "\x00never"]),
                       use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:first]
    assert len(out.token_ids) < len(full.token_ids)
    inc = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=stop,
                                                    include_stop_str_in_output=True), use_tqdm=False)[0]
    assert inc.text == text[: first + len(stop)]


def test_stop_token_ids_and_eos(llm):
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = llm.generate([PROMPTS[1]], greedy, use_tqdm=False)[0]
    tok = full.token_ids[5]
    k = full.token_ids.index(tok)
    out = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[tok]), use_tqdm=False)[0]
    assert out.token_ids == full.token_ids[: k + 1]
    assert out.finish_reason == "stop" and out.stop_reason == tok
    # EOS ends a request unless ignore_eos: make the model's own EOS id the stop.
    llm.engine.eos_token_ids.add(tok)
    try:
        out = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0]
        assert out.token_ids == full.token_ids[: k + 1] and out.finish_reason == "stop" and out.stop_reason is None
        out = llm.generate([PROMPTS[1]], greedy, use_tqdm=False)[0]
        assert out.token_ids == full.token_ids and out.finish_reason == "length"
    finally:
        llm.engine.eos_token_ids.discard(tok)


def test_text_equals_decode(llm):
    out = llm.generate(["The quick brown fox"], SamplingParams(temperature=0, max_tokens=25, ignore_eos=True), use_tqdm=False)[0]
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert out.prompt == "The quick brown fox"


def test_text_decoder_equals_transformers_decode(llm):
    """The detokenizer's direct backend call gives transformers' decode, specials and partial bytes included;
    a tokenizer that cleans up spaces keeps transformers' path."""
    import random

    from zipserve.workers.tokenizer import text_decoder

    tok = llm.tokenizer
    decode = text_decoder(tok)
    rng = random.Random(0)
    specials = list(tok.all_special_ids)
    for _ in range(200):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(len(tok)) for _ in range(rng.randint(0, 12))]
        assert decode(ids) == tok.decode(ids, skip_special_tokens=True), ids
    cleans = tok.clean_up_tokenization_spaces
    tok.clean_up_tokenization_spaces = True
    try:
        calls = []
        original = tok.decode
        tok.decode = lambda ids, **kw: calls.append(ids) or original(ids, **kw)
        text_decoder(tok)([5, 6])
        assert calls == [[5, 6]]
    finally:
        del tok.decode
        tok.clean_up_tokenization_spaces = cleans


def test_tiny_temperatures_are_greedy_not_nan(qwen3_path):
    """Found by the HTTP fuzzer: temperature 1e-300 overflowed logits / T to inf and NaN probabilities
    killed the engine loop. Below 1e-5 a request is greedy."""
    llm = LLM(qwen3_path, block_size=16, num_blocks=64, max_model_len=128)
    greedy = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    tiny = llm.generate([[5, 6, 7]], SamplingParams(temperature=1e-300, max_tokens=8, ignore_eos=True, seed=1),
                        use_tqdm=False)
    assert tiny[0].token_ids == greedy[0].token_ids


def test_invalid_distribution_fails_only_its_request(qwen3_path, monkeypatch):
    import zipserve.workers.engine as engine_mod
    from zipserve.workers import sampler

    llm = LLM(qwen3_path, block_size=16, num_blocks=64, max_model_len=128)
    real = sampler.sample_on_device
    poisoned = {"on": True}

    def poison(logits, params, *a, **k):  # the seeded request's row of logits turns to NaN once
        if poisoned["on"]:
            logits = logits.clone()
            logits[[i for i, p in enumerate(params) if p.seed == 99]] = float("nan")
            poisoned["on"] = False
        return real(logits, params, *a, **k)

    monkeypatch.setattr(sampler, "sample_on_device", poison)
    monkeypatch.setattr(engine_mod, "sample_on_device", poison)
    assert engine_mod.sample is sampler.sample
    outs = llm.generate([[5, 6, 7], [8, 9, 10]], [SamplingParams(temperature=1.0, seed=99, max_tokens=6),
                                                  SamplingParams(temperature=1.0, seed=7, max_tokens=6)],
                        use_tqdm=False)
    assert outs[0].finish_reason == "error" and outs[1].finish_reason in ("length", "stop")
    assert llm.stats()["free_pages"] == llm.stats()["total_pages"]
