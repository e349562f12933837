"""benchmarks/quality: the register-machine task, its tokenizer, the trained model and the evaluation (CPU)."""

import json
import os
import random
import re

import pytest
import torch

from benchmarks.quality import task, task_accuracy, train_task_model
from zipserve.workers import LLM, SamplingParams

MODEL = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "quality", "models", "registers")


def replay_trace(problem: task.Problem) -> int:
    """An independent interpreter: re-executes the trace from its text, finding each register's latest value by
    searching the text written so far (prompt and earlier lines) backwards, and checks every line's arithmetic."""
    if problem.mode == "table":
        return replay_table(problem)
    text = problem.prompt
    s = int(re.match(r"s=(\d\d);n=(\d\d\d);", text).group(1))
    lines = problem.trace.split("\n")
    assert lines[-1] == "" and lines[-2].startswith("ans=")
    assert len(lines) - 2 == problem.steps
    for k, line in enumerate(lines[:-2]):
        c = problem.steps - 1 - k
        if problem.mode == "registers":
            m = re.fullmatch(r"(\d{3}):(\d\d)\+(\d\d)>(\d)=(\d\d)", line)
            cc, ss, r, i, s2 = m.groups()
            assert int(i) == s % problem.registers
        elif problem.mode == "lookup":  # s first, then the entry restated as i=vv (the prompt's notation)
            m = re.fullmatch(r"(\d{3}):(\d\d):(\d)=(\d\d)>(\d\d)", line)
            cc, ss, i, r, s2 = m.groups()
            assert int(i) == (s + c) % problem.registers
            # a constant table: every statement of i so far (the prompt's and earlier lines') says the same
            assert {m.group(1) for m in re.finditer(rf"[,;:]{i}=(\d\d)", text)} == {r}, (k, line)
        else:
            m = re.fullmatch(r"(\d{3}):(\d):(\d\d)\+(\d\d)=(\d\d)(;\d=\d\d)?", line)
            cc, i, ss, r, s2, write = m.groups()
            assert int(i) == (s + c) % problem.registers
            assert (write is not None) == (c % task.WRITE_EVERY == 0)
            if write:
                assert write == f";{i}={s2}"
        assert int(cc) == c and int(ss) == s
        latest = [m.group(1) for m in re.finditer(rf"(?:[,;>]){i}=(\d\d)", text)][-1]  # the last write of i
        assert r == latest, (k, line)
        assert int(s2) == (int(r) + s) % 100
        s = int(s2)
        text += line + "\n"
    assert lines[-2] == f"ans={s:02d}" and problem.answer == s
    return s


def replay_table(problem: task.Problem) -> int:
    """table: the prompt is the first K worked steps; every line (prompt's and trace's) reads entry c mod K, which
    the line exactly K back stated (in the trace, no line since states it), and adds it to the last line's result."""
    K = problem.registers
    prompt_lines = problem.prompt.split("\n")
    assert prompt_lines[-1] == "" and len(prompt_lines) - 1 == K
    lines = problem.trace.split("\n")
    assert lines[-1] == "" and lines[-2].startswith("ans=") and len(lines) - 2 == problem.steps
    steps = [re.fullmatch(r"(\d{3}):(\d\d):(\d\d)=(\d\d)>(\d\d)", line).groups() for line in prompt_lines[:-1] + lines[:-2]]
    assert sorted(int(i) for _, _, i, _, _ in steps[:K]) == list(range(K))  # the prompt states each entry once
    s = int(steps[0][1])
    for k, (cc, ss, i, r, s2) in enumerate(steps):
        c = problem.steps + K - 1 - k
        assert int(cc) == c and int(ss) == s and int(i) == c % K
        if k >= K:
            assert steps[k - K][2:4] == (i, r) and all(st[2] != i for st in steps[k - K + 1:k]), k
        assert int(s2) == (int(r) + s) % 100
        s = int(s2)
    assert lines[-2] == f"ans={s:02d}" and problem.answer == s
    return s


@pytest.mark.parametrize("mode", task.MODES)
def test_generated_traces_are_correct_executions_of_the_machine(mode):
    problems = task.generate(40, 1, 60, registers=7, seed=3, mode=mode)
    assert {p.steps for p in problems} <= set(range(1, 61)) and len({p.steps for p in problems}) > 10
    for p in problems:
        replay_trace(p)
        assert task.check(p, p.trace) == {"correct": True, "answer": f"{p.answer:02d}", "correct_steps": p.steps,
                                          "steps": p.steps}


def test_generator_is_reproducible_from_its_seed_and_validates_parameters():
    a, b, c = (task.generate(5, 10, 20, seed=s) for s in (1, 1, 2))
    assert a == b and a != c
    with pytest.raises(ValueError, match="registers"):
        task.generate(1, 5, 5, registers=11)
    with pytest.raises(ValueError, match="steps"):
        task.generate(1, 5, 1000)
    with pytest.raises(ValueError, match=r"steps must be in \[1, 939\]"):  # table: the prompt's K steps count too
        task.generate(1, 950, 950, registers=60, mode="table")
    with pytest.raises(ValueError, match="mode"):
        task.generate(1, 5, 5, mode="nope")


def test_check_counts_leading_correct_steps_and_reads_the_answer():
    p = task.generate(1, 12, 12, seed=4)[0]
    lines = p.trace.split("\n")
    bad = lines[:]
    bad[5] = bad[5][:-1] + str((int(bad[5][-1]) + 1) % 10)  # one wrong digit in step 6
    g = task.check(p, "\n".join(bad))
    assert g["correct_steps"] == 5 and g["correct"] is True  # the answer line is still right
    wrong_answer = "\n".join(lines[:-2] + [f"ans={(p.answer + 1) % 100:02d}", ""])
    assert task.check(p, wrong_answer)["correct"] is False
    assert task.check(p, "")["answer"] is None and task.check(p, "")["correct"] is False


def test_character_tokenizer_round_trips_and_matches_the_committed_one():
    tok = task.build_tokenizer()
    p = task.generate(1, 30, 30, seed=5, mode="rereads")[0]
    text = p.prompt + p.trace
    ids = task.encode(tok, text)
    assert len(ids) == len(text) and tok.decode(ids) == text
    with pytest.raises(ValueError, match="alphabet"):
        task.encode(tok, "s=12 x")
    from transformers import AutoTokenizer

    committed = AutoTokenizer.from_pretrained(MODEL)
    assert committed.encode(text, add_special_tokens=False) == ids
    assert committed.eos_token_id == tok.eos_token_id


@pytest.mark.parametrize("mode", ["registers", "lookup"])
def test_committed_model_engine_greedy_equals_transformers_greedy_and_solves_short_problems(mode):
    """The oracle: transformers' greedy decoding of the committed weights, token for token."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    model = os.path.join(os.path.dirname(MODEL), mode)
    tok = AutoTokenizer.from_pretrained(model)
    hf = Qwen3ForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    llm = LLM(model, block_size=16, max_model_len=1024, dtype="float32")
    problems = task.generate(4, 20, 30, seed=99, mode=mode)
    solved = 0
    for p in problems:
        ids = task.encode(tok, p.prompt)
        want = hf.generate(torch.tensor([ids]), max_new_tokens=len(p.trace) + 4, do_sample=False,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        got = llm.generate([ids], SamplingParams(temperature=0, max_tokens=len(p.trace) + 4), use_tqdm=False)[0]
        assert list(got.token_ids) == want
        solved += task.check(p, tok.decode(got.token_ids, skip_special_tokens=True))["correct"]
    assert solved >= 3  # trained weights (an untrained model solves none)


def test_read_offsets_point_at_the_value_each_step_reads():
    for mode, line in [("registers", "004:57+97>1=54"), ("rereads", "004:5:57+63=20;5=20"), ("lookup", "004:57:5=63>20"),
                       ("table", "004:41:04=15>56")]:
        p = task.Problem("", line + "\nans=20\n", 20, 1, 10, mode)
        assert [p.trace[k] for k in task.read_offsets(p)] == list(re.findall(r"[+=](\d\d)[>=]", line)[0])


def test_teacher_forced_replay_equals_transformers_and_a_window_shorter_than_k_lines_loses_the_reads():
    """The committed table model (K = 30) replayed teacher-forced: with full KV its per-position argmax is
    transformers' on the same text (the oracle), and it reads every entry from 30 lines back; a sliding window
    of 128 entries holds none of them, so its reads can only be right by chance."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    model = os.path.join(os.path.dirname(MODEL), "table")
    tok = AutoTokenizer.from_pretrained(model)
    hf = Qwen3ForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    problems = task.generate(3, 6, 10, registers=30, seed=7, mode="table")
    right = reads = reads_right = tokens = 0
    for p in problems:
        prompt, ref = task.encode(tok, p.prompt), task.encode(tok, p.trace) + [tok.eos_token_id]
        with torch.no_grad():
            pred = hf(input_ids=torch.tensor([prompt + ref[:-1]])).logits[0, len(prompt) - 1:].argmax(-1).tolist()
        ok = [a == b for a, b in zip(pred, ref)]
        right, tokens = right + sum(ok), tokens + len(ok)
        reads += len(task.read_offsets(p))
        reads_right += sum(ok[k] for k in task.read_offsets(p))
    assert reads_right == reads  # the model reads every entry from K lines back
    full = task_accuracy.replay_reads(LLM(model, block_size=16, max_model_len=1024, dtype="float32"), tok, problems)
    assert full["token_accuracy"] == right / tokens and full["read_accuracy"] == 1.0 and full["accuracy"] == 1.0
    window = LLM(model, block_size=16, max_model_len=1024, dtype="float32", budget_blocks=8,
                 compression=dict(recent_window=128))
    slid = task_accuracy.replay_reads(window, tok, problems)
    assert slid["compressions"] > 0 and slid["read_accuracy"] < 0.5 and slid["accuracy"] == 0.0


def test_task_accuracy_full_vs_a_roomy_budget_agree_and_a_tiny_budget_compresses(tmp_path):
    args = task_accuracy.add_arguments(__import__("argparse").ArgumentParser()).parse_args(
        ["--model", MODEL, "--problems", "3", "--min-steps", "12", "--max-steps", "16", "--budgets", "0.1,1.2",
         "--settings", "+pooling", "--block-size", "16", "--out", str(tmp_path), "--tag", "_t"])
    res = task_accuracy.run(args)
    full, tiny, roomy = res["runs"]
    assert full["setting"] == "full KV" and roomy["budget_fraction"] == 1.2
    assert roomy["compressions"] == 0 and roomy["accuracy"] == full["accuracy"]
    assert roomy["mean_correct_step_fraction"] == full["mean_correct_step_fraction"]
    assert tiny["compressions"] > 0 and tiny["relative_to_full"] == tiny["accuracy"] / full["accuracy"]
    with open(tmp_path / "task_accuracy_registers_t.json") as f:
        assert json.load(f)["runs"][1]["budget_blocks"] == tiny["budget_blocks"]
    merged = task_accuracy.merge([str(tmp_path / "task_accuracy_registers_t.json")] * 2, str(tmp_path))
    assert len(merged["runs"]) == 6


def test_training_script_lowers_the_loss_and_saves_a_folder_our_engine_serves(tmp_path):
    out = str(tmp_path / "m")
    summary = train_task_model.main(["--minutes", "5", "--train-steps", "300", "--layers", "1", "--hidden", "32", "--heads", "2",
                                     "--kv-heads", "1", "--min-steps", "3", "--max-steps", "6", "--registers", "3",
                                     "--batch-tokens", "1024", "--eval-every", "100", "--eval-problems", "8",
                                     "--warmup", "5", "--max-positions", "256", "--lr", "3e-3", "--out", out])
    hist = summary["history"]
    assert hist[0]["step"] == 0 and hist[-1]["step"] == 300 and hist[-1]["loss"] < 0.6 * hist[0]["loss"]
    p = task.make_problem(random.Random(1), 4, 3)
    llm = LLM(out, block_size=16, max_model_len=256)
    got = llm.generate([task.encode(llm.tokenizer, p.prompt)], SamplingParams(temperature=0, max_tokens=8),
                       use_tqdm=False)[0]
    assert len(got.token_ids) >= 1


def test_curriculum_cap_rises_from_its_start_to_max_steps_then_stays():
    ap = train_task_model.add_arguments(__import__("argparse").ArgumentParser())
    args = ap.parse_args(["--curriculum", "0.3", "--max-steps", "260"])
    caps = [train_task_model.steps_cap(args, f / 100) for f in range(101)]
    assert caps[0] == 12 and caps[29] < 260 and caps[30:] == [260] * 71
    assert caps == sorted(caps) and abs(caps[15] - (12 + 260) / 2) <= 1  # linear
    assert {train_task_model.steps_cap(ap.parse_args([]), f) for f in (0.0, 0.5)} == {260}  # off by default
