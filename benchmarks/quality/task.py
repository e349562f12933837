"""Synthetic long-reasoning tasks with checkable chains of thought: a register machine, three modes.

A problem states a start value `s`, a step count `n` and the values of K registers (in shuffled order):

    s=37;n=150;3=44,0=17,9=05,...\n

Its solution is n trace lines, then the answer:

    149:37+44>7=81\n     step 149 (counting down): read register i = s mod K (here 7, value 44),
    148:81+17>1=98\n     s' = (r + s) mod 100, write s' back to register i, and s = s'
    ...
    000:..+..>.=62\n
    ans=62<eos>

Every step needs the latest value of a register written by an arbitrary earlier line (or stated in the
prompt): registers go unread for tens of lines at random, so a compressed cache must keep exactly the
live writes (the last `i=vv` of each register) among many dead ones to stay correct, and one wrong step
makes the answer wrong. The trace is 15 tokens a step (character tokens), so 100-250 steps are 1.5k-3.8k
tokens. This "registers" mode is the hard case for attention-scored eviction: a value is read exactly once,
by the line that overwrites it, so a live value has never been attended and a dead one just was.

The "rereads" mode is closer to reasoning that reuses its facts: every step reads register
i = (s + counter) mod K, and only every third step writes its result back (after the line, as `;i=vv`),
so a value is read about three times before it is overwritten, from up to hundreds of tokens away:

    149:6:37+44=81\n          i = (37 + 149) mod 10 = 6 (value 44): s = 81
    148:9:81+17=98\n          i = 9 (value 17): s = 98
    147:5:98+30=28;5=28\n     i = 5 (value 30): s = 28; 147 is a multiple of 3: register 5 = 28

On 100-220 steps (about 2.8k tokens) the value a step reads was written a median 170 tokens back, 10% over
980 and 1% over 2,200 tokens.

The "lookup" mode is "arithmetic over values stated in the prompt": the registers are a constant table in
the prompt that every step consults (i = (s + counter) mod K), and each line restates the entry it used in
the prompt's own notation, as reasoning restates the givens it works with:

    149:37:6=44>81\n          s = 37 (the last line's result), i = (37 + 149) mod 10 = 6, table[6] = 44:
    148:81:9=17>98\n          s = 37 + 44 = 81

An entry can be copied from the prompt or from any earlier line that used it (all say the same), so what a
compressed cache must keep is any one statement of each entry plus the last line. But the index is not
random: i' = (s + table[i] + counter - 1) mod K = i + table[i] - 1 (mod K), a function of i alone, so after
a short transient the lines cycle over a few entries (1-7 of 10; on 256 problems an entry was last stated
at most 7 lines back, and no entry is first used after line 20): lookup's dependencies are local, and it
measures how whole a policy keeps the recent lines, not long-range recall.

(A first version wrote the value only as an operand, `149:6:37+44=81`: a 6.3M model learned to copy it
from the last line that used the same entry but, in 10 minutes, never to read the prompt's `6=44`. A second
restated the entry first, `149:6=44:37>81`, and did no better (token accuracy 0.995, none solved), maybe
because its index digit comes before the `s` it is computed from: the model had to add the previous
line's result to the counter in one token, before writing either. The current order writes s first,
copied from the previous line's end, so every token depends only on tokens just written -- the counter and
s give i, `i=` is the key to look up in the prompt, s and the entry give the result --, a local computation
per line, as in the registers mode, which a 6.3M model learned in 8 minutes. With this order and short
problems first (train_task_model.py's `--curriculum 0.3`) the 6.3M model learned lookup in 9.2 minutes on
an H200: all 32 held-out 260-step problems solved, teacher-forced.)

The "table" mode is the long-range version: the counter alone picks the entry, i = counter mod K (two-digit
names, K up to 100), and the prompt is the problem's first K steps, worked (so it states every entry once,
in the trace's own notation); the model goes on for n more steps:

    prompt: 229:18:69=44>62\n ... 150:20:70=17>37\n     K = 80 worked steps, counters n + K - 1 .. n
    149:37:69=44>81\n         entry 69 = 44 was last stated exactly K lines (1,280 tokens) back
    148:81:68=17>98\n

Every entry a line needs was stated exactly K lines (16 K tokens) back, and by no line since: a sliding
window shorter than that loses it, and a compressed cache must keep, out of each of the last K lines, the
two digits of its entry (one in 8 of its tokens) -- entries that were last attended when they were written.
(A first version stated the table in the prompt as `s=..;n=..;69=44,...`, so the first K lines read it by
name and the rest by a constant distance: a 6.3M model learned only the constant-distance copy in 9
minutes.) With the worked prompt, a 6.3M model trained 8 minutes on an H200 (K = 30) reads every entry
right -- teacher-forced, every entry digit of held-out 100-step problems is its argmax -- but has not yet
learned the sum's carry (the tens digit of s' is wrong on most lines), so it solves no problem by itself;
task_accuracy.py's `--teacher-forced` measures what compression costs its reads (`read_offsets`).

`generate(...)` draws problem sets from a seed; `check(...)` grades a completion.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

CHARS = "0123456789:;,+>=\nsna"  # every character the task writes
SPECIALS = ("<pad>", "<eos>")
MODULUS = 100


@dataclass(frozen=True)
class Problem:
    prompt: str
    trace: str  # the solution lines, ending with "ans=vv\n" (the model then emits <eos>)
    answer: int
    steps: int
    registers: int
    mode: str = "registers"


MODES = ("registers", "rereads", "lookup", "table")
WRITE_EVERY = 3  # rereads: steps whose counter is a multiple of this write back


def make_problem(rng: random.Random, steps: int, registers: int = 10, mode: str = "registers") -> Problem:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "table" and not 2 <= registers <= 100:
        raise ValueError(f"registers must be in [2, 100] (two-digit names), got {registers}")
    if mode != "table" and not 2 <= registers <= 10:
        raise ValueError(f"registers must be in [2, 10] (one-digit names), got {registers}")
    first = steps + registers if mode == "table" else steps  # table: the prompt works the first K steps
    if not 1 <= steps or first > 999:
        raise ValueError(f"steps must be in [1, {999 - (first - steps)}] (three-digit counter), got {steps}")
    regs = [rng.randrange(MODULUS) for _ in range(registers)]
    s = rng.randrange(MODULUS)
    order = list(range(registers))
    rng.shuffle(order)
    prompt = f"s={s:02d};n={steps:03d};" + ",".join(f"{i}={regs[i]:02d}" for i in order) + "\n"
    lines = []
    for c in range(first - 1, -1, -1):
        # rereads, lookup: the counter joins the index (s alone would cycle through a few registers)
        # (lookup's i walks i -> i + table[i] - 1 mod K, a function of i alone, so it falls into a short cycle;
        # table's index is the counter's, so each entry comes back exactly every K lines)
        i = s % registers if mode == "registers" else c % registers if mode == "table" else (s + c) % registers
        r = regs[i]
        s2 = (r + s) % MODULUS
        if mode == "registers":
            lines.append(f"{c:03d}:{s:02d}+{r:02d}>{i}={s2:02d}\n")
            regs[i] = s2
        elif mode == "lookup":
            lines.append(f"{c:03d}:{s:02d}:{i}={r:02d}>{s2:02d}\n")
        elif mode == "table":
            lines.append(f"{c:03d}:{s:02d}:{i:02d}={r:02d}>{s2:02d}\n")
        elif c % WRITE_EVERY == 0:
            lines.append(f"{c:03d}:{i}:{s:02d}+{r:02d}={s2:02d};{i}={s2:02d}\n")
            regs[i] = s2
        else:
            lines.append(f"{c:03d}:{i}:{s:02d}+{r:02d}={s2:02d}\n")
        s = s2
    if mode == "table":
        prompt, lines = "".join(lines[:registers]), lines[registers:]
    lines.append(f"ans={s:02d}\n")
    return Problem(prompt, "".join(lines), s, steps, registers, mode)


def generate(count: int, min_steps: int, max_steps: int, registers: int = 10, seed: int = 0,
             mode: str = "registers") -> list[Problem]:
    """`count` problems with step counts uniform in [min_steps, max_steps], reproducible from `seed`."""
    if not 1 <= min_steps <= max_steps <= 999:
        raise ValueError(f"need 1 <= min_steps <= max_steps <= 999 (three-digit counter), got {min_steps}, {max_steps}")
    rng = random.Random(seed)
    return [make_problem(rng, rng.randint(min_steps, max_steps), registers, mode) for _ in range(count)]


def check(problem: Problem, completion: str) -> dict:
    """Grade a completion: exact answer, and how many leading trace lines are right."""
    want = problem.trace.split("\n")
    got = completion.split("\n")
    correct_lines = 0
    for w, g in zip(want[:-2], got):  # the step lines (the last two are 'ans=..' and '')
        if w != g:
            break
        correct_lines += 1
    answer = None
    for line in got:
        if line.startswith("ans="):
            answer = line[4:]
            break
    return {"correct": answer == f"{problem.answer:02d}", "answer": answer, "correct_steps": correct_lines,
            "steps": problem.steps}


READ_VALUE = {"registers": r"\+(\d\d)>", "rereads": r"\+(\d\d)=", "lookup": r"=(\d\d)>", "table": r"=(\d\d)>"}


def read_offsets(problem: Problem) -> list[int]:
    """Offsets in `problem.trace` (= token positions: one token per character) of the digits of every value a
    step reads -- from the prompt or an earlier line: the long-range part of the task."""
    return [m.start(1) + j for m in re.finditer(READ_VALUE[problem.mode], problem.trace) for j in (0, 1)]


def build_tokenizer():
    """A character-level fast tokenizer (one token per character), as a transformers tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   clean_up_tokenization_spaces=False)


def encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != len(text) or tokenizer.pad_token_id in ids:  # an unknown character becomes <pad>
        raise ValueError(f"text has characters outside the task's alphabet: {text!r}")
    return ids
