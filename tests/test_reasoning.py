"""The reasoning parsers: the split of whole outputs, and streamed splits (every cut of the text into two or
three chunks, tags cut anywhere) giving the same parts."""

import itertools

import pytest

from zipserve.cluster.reasoning import ReasoningParser, split_reasoning

CASES = [
    ("qwen3", "<think>\nLet me add.\n2+2=4</think>\n\nThe answer is 4.", "\nLet me add.\n2+2=4", "\n\nThe answer is 4."),
    ("qwen3", "The answer is 4.", None, "The answer is 4."),
    ("qwen3", "  <think>a < b</think>yes", "a < b", "yes"),
    ("qwen3", "<think>never closed", "never closed", None),
    ("qwen3", "<thin", None, "<thin"),
    ("qwen3", "answer with </think> inside", None, "answer with </think> inside"),
    ("deepseek_r1", "step 1, step 2</think>\n\nDone.", "step 1, step 2", "\n\nDone."),
    ("deepseek_r1", "<think>step</think>Done.", "step", "Done."),
    ("deepseek_r1", "no end tag at all", "no end tag at all", None),
    ("deepseek_r1", "a </thi b</think>c", "a </thi b", "c"),
]


@pytest.mark.parametrize("family, text, reasoning, content", CASES)
def test_whole_and_streamed_splits_agree(family, text, reasoning, content):
    assert split_reasoning(family, text) == (reasoning, content)
    for cuts in itertools.chain(itertools.combinations(range(1, len(text)), 1),
                                itertools.combinations(range(1, len(text)), 2)):
        p, r, c = ReasoningParser(family), "", ""
        bounds = [0, *cuts, len(text)]
        for a, b in zip(bounds, bounds[1:]):
            dr, dc = p.feed(text[a:b])
            r, c = r + dr, c + dc
        dr, dc = p.feed("", final=True)
        assert (r + dr or None, (c + dc) if (c + dc) or not (r + dr) else None) == (reasoning, content), cuts


def test_an_unknown_family_is_refused():
    with pytest.raises(ValueError, match="reasoning_parser"):
        ReasoningParser("gpt-9")


def test_an_unknown_family_in_the_app_config_fails_the_deploy(qwen3_path):
    pytest.importorskip("ray")
    from zipserve.cluster.app import resolve_config

    with pytest.raises(ValueError, match="reasoning_parser"):
        resolve_config({"model": qwen3_path, "ingress": {"reasoning_parser": "gpt-9"}})
    assert resolve_config({"model": qwen3_path, "ingress": {"reasoning_parser": "qwen3"}})["ingress"] == \
        {"reasoning_parser": "qwen3"}
