"""Penalties, logit_bias and min_tokens in the engine, against transformers: its model's logits, with its own
RepetitionPenaltyLogitsProcessor for the repetition penalty and OpenAI's documented formula for presence and
frequency penalties, decoded greedily one token at a time."""

import pytest
import torch

from zipserve.workers import LLM, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 5, 6, 7], [(j * 7) % 200 + 3 for j in range(29)], [40, 41, 40, 41, 40]]


def _oracle(model_path, prompt, steps, repetition=1.0, presence=0.0, frequency=0.0):
    from transformers import AutoModelForCausalLM, RepetitionPenaltyLogitsProcessor

    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    rep = RepetitionPenaltyLogitsProcessor(repetition) if repetition != 1.0 else None
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = hf(torch.tensor([ids])).logits[:, -1].float()
            if rep is not None:
                logits = rep(torch.tensor([ids]), logits)
            counts = torch.bincount(torch.tensor(ids[len(prompt):], dtype=torch.long), minlength=logits.shape[-1])
            logits = logits - frequency * counts - presence * (counts > 0).float()
            ids.append(int(logits.argmax(-1)))
    return ids[len(prompt):]


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.5), dict(presence_penalty=1.5),
                                dict(frequency_penalty=0.7), dict(repetition_penalty=1.2, frequency_penalty=0.5,
                                                                  presence_penalty=0.3)],
                         ids=["repetition", "presence", "frequency", "all"])
@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
def test_penalized_greedy_equals_transformers_and_unpenalized_neighbours_are_untouched(qwen3_path, kw, overlap):
    """Async scheduling: the step's input token is still on the device when the next is sampled; the
    counts are updated on the device, so both schedules give the same tokens."""
    llm = LLM(qwen3_path, block_size=8, num_blocks=64, dtype="float32",  # full KV: the oracle attends to all
              async_scheduling=overlap)
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = [o.token_ids for o in llm.generate(PROMPTS, plain, use_tqdm=False)]
    penalized = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **kw)
    mixed = llm.generate(PROMPTS, [penalized, plain, penalized], use_tqdm=False)
    names = {"repetition_penalty": "repetition", "presence_penalty": "presence", "frequency_penalty": "frequency"}
    oracle_kw = {names[k]: v for k, v in kw.items()}
    for i in (0, 2):
        assert mixed[i].token_ids == _oracle(qwen3_path, PROMPTS[i], 24, **oracle_kw)
    assert mixed[1].token_ids == alone[1]  # a batch neighbour without penalties samples exactly as alone
    assert mixed[0].token_ids != alone[0] or mixed[2].token_ids != alone[2]  # the penalty did something
    assert llm.engine.penalties.row_of == {}  # rows go back when requests end


def test_logit_bias_and_min_tokens(qwen3_path):
    llm = LLM(qwen3_path, block_size=8, num_blocks=64, dtype="float32")
    base = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    forced = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                       logit_bias={42: 100.0}), use_tqdm=False)[0]
    assert forced.token_ids == [42] * 6
    banned = base.token_ids[0]
    avoided = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                        logit_bias={banned: -100.0}), use_tqdm=False)[0]
    assert banned not in avoided.token_ids
    stop = base.token_ids[2]
    early = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop]),
                         use_tqdm=False)[0]
    assert len(early.token_ids) == 3 and early.finish_reason == "stop"
    held = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop],
                                                     min_tokens=6), use_tqdm=False)[0]
    assert len(held.token_ids) >= 6 and stop not in held.token_ids[:6]
    assert held.token_ids[:2] == base.token_ids[:2]


@pytest.mark.parametrize("kw, msg", [
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(presence_penalty=3), "presence_penalty"),
    (dict(frequency_penalty="x"), "frequency_penalty"), (dict(min_tokens=-1), "min_tokens"),
    (dict(logit_bias={"a": 1}), "logit_bias"), (dict(logit_bias={3: 101}), "logit_bias"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens"),
])
def test_bad_penalty_params_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def test_logit_bias_outside_the_vocabulary_is_refused(qwen3_path):
    llm = LLM(qwen3_path, block_size=8, num_blocks=64)
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, logit_bias={10**6: 1.0}), use_tqdm=False)


def _bad_words_oracle(model_path, prompt, steps, sequences):
    """Greedy decoding by transformers with vLLM's rule: a one-token sequence is never generated; a longer
    one's last token is banned where the output ends with the rest of it."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
            for seq in sequences:
                if len(seq) == 1 or out[len(out) - len(seq) + 1:] == seq[:-1]:
                    logits[seq[-1]] = float("-inf")
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out


@pytest.mark.parametrize("overlap", [True, False])
def test_bad_words_equal_the_reference_rule(qwen3_path, overlap):
    llm = LLM(qwen3_path, block_size=16, async_scheduling=overlap)
    tok = llm.tokenizer
    free = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    words = []
    for o in free:  # a word each output would write (two tokens' text) and, with it, its leading token alone
        words.append(tok.decode(list(o.token_ids[4:6])).strip() or "x")
    sequences = []
    for w in words:
        for text in (w, " " + w):
            ids = tok.encode(text, add_special_tokens=False)
            if ids not in sequences:
                sequences.append(ids)
    assert any(len(s) > 1 for s in sequences)  # the multi-token rule is exercised
    got = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, bad_words=words),
                       use_tqdm=False)
    for prompt, o, f in zip(PROMPTS, got, free):
        assert list(o.token_ids) == _bad_words_oracle(qwen3_path, prompt, 24, sequences)
    assert any(list(o.token_ids) != list(f.token_ids) for o, f in zip(got, free))
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=[" "])


def test_allowed_token_ids_restrict_sampling_to_them(qwen3_path):
    llm = LLM(qwen3_path, block_size=16)
    allowed = [7, 19, 101]
    got = llm.generate(PROMPTS, [SamplingParams(temperature=1.0, seed=i, max_tokens=16, ignore_eos=True,
                                                allowed_token_ids=allowed if i != 1 else None) for i in range(3)],
                       use_tqdm=False)
    free = llm.generate(PROMPTS[1:2], SamplingParams(temperature=1.0, seed=1, max_tokens=16, ignore_eos=True),
                        use_tqdm=False)[0]
    assert set(got[0].token_ids) <= set(allowed) and set(got[2].token_ids) <= set(allowed)
    assert list(got[1].token_ids) == list(free.token_ids)  # its neighbour in the batch is untouched
    with pytest.raises(ValueError, match="allowed_token_ids"):
        llm.engine.add_request("x", [1, 2], SamplingParams(allowed_token_ids=[10 ** 7]))
