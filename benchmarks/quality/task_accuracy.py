"""Exact-answer accuracy on the register-machine task, full KV vs compressed at several budgets.

    python -m benchmarks.quality.task_accuracy --model benchmarks/quality/models/registers \
        --problems 256 --min-steps 100 --max-steps 250 --budgets 0.12,0.25,0.5 --block-size 32
    python -m benchmarks.quality.task_accuracy --model benchmarks/quality/models/lookup   (its mode is read
        from the model folder's train_log.json)
    zipserve bench task_accuracy ...   (the same)

Problems are drawn from the generator with an evaluation seed the training never used; each is solved by
greedy decoding until <eos> (or the trace length + 16 tokens) through our engine: once with full KV,
then with a budget of pages per request (a fraction of the mean prompt + trace length) under each
scoring setting. Reported per run: exact-answer accuracy, its ratio to full KV, mean leading correct
steps, compressions. Several processes may split the settings (`--settings`, `--no-full`) and
`--merge` joins their JSON files into one table and plot.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch

from benchmarks.quality.fidelity import SETTINGS, Replay, join_parts, setting_knobs, tail_sweep, write
from benchmarks.quality.task import MODES, check, encode, generate, read_offsets

log = logging.getLogger("benchmarks.quality.task_accuracy")


def solve(llm, tokenizer, problems, **engine_note) -> dict:
    """Greedy solutions of every problem through `llm`; accuracy and step statistics."""
    from zipserve.workers import SamplingParams

    prompts = [encode(tokenizer, p.prompt) for p in problems]
    params = [SamplingParams(temperature=0, max_tokens=len(p.trace) + 16) for p in problems]
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t
    grades = [check(p, tokenizer.decode(o.token_ids, skip_special_tokens=True)) for p, o in zip(problems, outs)]
    n = len(problems)
    return {"accuracy": sum(g["correct"] for g in grades) / n,
            "mean_correct_step_fraction": sum(g["correct_steps"] / g["steps"] for g in grades) / n,
            "generated_tokens": sum(len(o.token_ids) for o in outs), "seconds": seconds,
            "compressions": llm.engine.stats().get("compressions", 0), **engine_note}


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from zipserve.workers import LLM

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    mode = args.mode or trained_mode(args.model)
    registers = args.registers or trained_args(args.model).get("registers", 10)
    problems = generate(args.problems, args.min_steps, args.max_steps, registers, seed=args.seed, mode=mode)
    lengths = [len(p.prompt) + len(p.trace) + 1 for p in problems]
    mean_len = sum(lengths) / len(lengths)
    longest = max(lengths) + 16
    common = dict(block_size=args.block_size, max_model_len=longest, max_num_seqs=len(problems), dtype=args.dtype,
                  max_num_batched_tokens=max(8192, longest))
    if args.device:
        common["device"] = args.device
    cuda = torch.cuda.is_available() and args.device in (None, "cuda")
    results = {"benchmark": "task_accuracy", "model": os.path.basename(args.model.rstrip("/")),
               "device": torch.cuda.get_device_name(0) if cuda else "cpu", "problems": len(problems),
               "mode": mode, "steps": [args.min_steps, args.max_steps], "registers": registers, "seed": args.seed,
               "teacher_forced": args.teacher_forced,
               "mean_tokens": mean_len, "block_size": args.block_size, "dtype": args.dtype, "runs": []}
    stem = os.path.join(args.out, f"task_accuracy_{results['model']}{args.tag}")
    overrides = json.loads(args.overrides) if args.overrides else {}
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else []
    settings = args.settings.split(",") if args.settings else []
    measure = replay_reads if args.teacher_forced else solve
    bar = tqdm(total=len(budgets) * len(settings) + (not args.no_full), desc="task accuracy", unit="run")
    if not args.no_full:
        full = LLM(args.model, num_blocks=len(problems) * (-(-longest // args.block_size) + 1), **common)
        row = measure(full, tokenizer, problems, setting="full KV", budget_fraction=None, budget_blocks=None)
        del full
        results["runs"].append(row)
        log.info("full KV: %s (%.0f s)", _summary(row), row["seconds"])
        bar.update(1)
        write(results, stem)
    for frac in budgets:
        blocks = max(1, round(frac * mean_len / args.block_size))
        for name in settings:
            knobs, label = setting_knobs(name, args.query_window, overrides)
            comp = LLM(args.model, budget_blocks=blocks, num_blocks=len(problems) * (blocks + 2), compression=knobs,
                       **common)
            row = measure(comp, tokenizer, problems, setting=label, budget_fraction=frac, budget_blocks=blocks,
                        budget_tokens=blocks * args.block_size, compression=knobs)
            del comp
            results["runs"].append(row)
            log.info("budget %.0f%% (%d pages of %d) %-12s: %s, %d compressions (%.0f s)", 100 * frac, blocks,
                     args.block_size, label, _summary(row), row["compressions"], row["seconds"])
            bar.update(1)
            write(results, stem)
    bar.close()
    return finish(results, stem)

def replay_reads(llm, tokenizer, problems, **engine_note) -> dict:
    """Teacher-forced: every problem's reference trace is forced through `llm` (the engine's step observer), and
    each position's argmax is compared with the reference token. Separates the long-range part of the task --
    the digits of each value a step reads (task.read_offsets) -- from the local arithmetic; "accuracy" here is
    the share of problems whose every read is right, what exact-answer accuracy would be with perfect
    arithmetic. For a model whose full-KV answers are not yet exact, this still measures what compression costs."""
    from zipserve.workers import SamplingParams

    refs = {f"p{i}": encode(tokenizer, p.trace) + [tokenizer.eos_token_id] for i, p in enumerate(problems)}
    observer = Replay(refs)
    llm.engine.step_observer = observer
    t = time.perf_counter()
    try:
        for (rid, ref), p in zip(refs.items(), problems):
            llm.engine.add_request(rid, encode(tokenizer, p.prompt),
                                   SamplingParams(temperature=0, max_tokens=len(ref), ignore_eos=True))
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
    finally:
        llm.engine.step_observer = None
    seconds = time.perf_counter() - t
    counts = dict.fromkeys(("tokens", "right", "reads", "reads_right", "late_reads", "late_reads_right"), 0)
    all_reads_right = 0
    for (rid, ref), p in zip(refs.items(), problems):
        pred = torch.stack([observer.rows.pop((rid, k)) for k in range(len(ref))]).argmax(-1).tolist()
        ok = [a == b for a, b in zip(pred, ref)]
        reads = read_offsets(p)
        late = [k for k in reads if k >= observer.first_compression.get(rid, len(ref))]
        counts["tokens"] += len(ok)
        counts["right"] += sum(ok)
        counts["reads"] += len(reads)
        counts["reads_right"] += sum(ok[k] for k in reads)
        counts["late_reads"] += len(late)
        counts["late_reads_right"] += sum(ok[k] for k in late)
        all_reads_right += all(ok[k] for k in reads)
    return {"accuracy": all_reads_right / len(problems), "teacher_forced": True,
            "token_accuracy": counts["right"] / counts["tokens"],
            "read_accuracy": counts["reads_right"] / counts["reads"],
            "read_accuracy_after_first_compression":
                counts["late_reads_right"] / counts["late_reads"] if counts["late_reads"] else None,
            "reads": counts["reads"], "seconds": seconds,
            "compressions": llm.engine.stats().get("compressions", 0), **engine_note}


def _summary(row: dict) -> str:
    if row.get("teacher_forced"):
        return (f"all reads right {row['accuracy']:.3f}, read digits {row['read_accuracy']:.4f}, "
                f"tokens {row['token_accuracy']:.4f} (teacher-forced)")
    return f"accuracy {row['accuracy']:.3f}, steps right {row['mean_correct_step_fraction']:.3f}"


def trained_args(model: str) -> dict:
    """The arguments a model folder was trained with (train_task_model.py's log), {} if it has none."""
    path = os.path.join(model, "train_log.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)["args"]


def trained_mode(model: str) -> str:
    """The task mode a model folder was trained on, "registers" if it has no log."""
    return trained_args(model).get("mode", "registers")


def finish(results: dict, stem: str) -> dict:
    """Ratios to full KV (when the runs include it), JSON and PNG."""
    full = [r for r in results["runs"] if r["setting"] == "full KV"]
    if full:
        for r in results["runs"]:
            r["relative_to_full"] = r["accuracy"] / full[0]["accuracy"] if full[0]["accuracy"] else None
    write(results, stem)
    plot(results, stem + ".png")
    return results


def merge(paths: list[str], out: str) -> dict:
    """One table from several processes' JSON files (same model and problems; runs concatenated)."""
    results = join_parts(paths, ("model", "mode", "problems", "steps", "registers", "seed", "block_size", "dtype",
                                 "teacher_forced"))
    return finish(results, os.path.join(out, f"task_accuracy_{results['model']}"))


def _label(run: dict) -> str:
    """A run's setting, with its query window where that is not the default 16."""
    q = (run.get("compression") or {}).get("query_window", 16)
    return run["setting"] + (f" ({q} queries)" if q != 16 else "")


def plot(results: dict, path: str) -> None:
    """Accuracy against budget per setting; with a recent-window sweep, a second panel: accuracy against the
    share of the budget kept for the most recent entries, per budget and scoring setting."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    runs = results["runs"]
    # teacher-forced: the share of read digits right (every-read-right is 0 or 1 on long-range tasks)
    y = (lambda r: r["read_accuracy"]) if results.get("teacher_forced") else (lambda r: r["accuracy"])
    ylabel = "entry digits read right (teacher-forced)" if results.get("teacher_forced") else "exact-answer accuracy"
    sweep = tail_sweep(runs, _label)
    swept = [r for points in sweep.values() for _, r in points]
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(13 if sweep else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    for name in dict.fromkeys(_label(r) for r in runs if r["setting"] != "full KV"):
        rows = sorted((r for r in runs if _label(r) == name), key=lambda r: r["budget_fraction"])
        if len(rows) < 2 and rows[0] in swept:  # a single point of the tail sweep: the second panel has it
            continue
        ax.plot([100 * r["budget_fraction"] for r in rows], [y(r) for r in rows], "o-", label=name)
    for (frac, base), points in sweep.items():
        axes[0][1].plot([s for s, _ in points], [y(r) for _, r in points], "o-", label=f"{100 * frac:.0f}% budget, {base}")
    if sweep:
        axes[0][1].set(xlabel="recent tail / budget (1 = a sliding window)", ylabel=ylabel, ylim=(0, 1.02))
    for r in runs:
        if r["setting"] == "full KV":
            for a in axes[0]:
                a.axhline(y(r), color="k", ls="--", label=f"full KV ({y(r):.3f})")
    ax.set(xlabel="budget (% of mean prompt + trace tokens)", ylabel=ylabel, ylim=(0, 1.02))
    for a in axes[0]:
        a.legend(fontsize=7)
    fig.suptitle(f"{results['model']}: {results['problems']} {results.get('mode', 'registers')} problems, "
                 f"{results['steps'][0]}-{results['steps'][1]} steps (~{results['mean_tokens']:.0f} tokens), "
                 f"pages of {results['block_size']}; {results['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--model", default="benchmarks/quality/models/registers")
    ap.add_argument("--problems", type=int, default=256)
    ap.add_argument("--min-steps", type=int, default=100)
    ap.add_argument("--max-steps", type=int, default=250)
    ap.add_argument("--registers", type=int, default=None, help="K (default: the model's training K, else 10)")
    ap.add_argument("--mode", default=None, choices=MODES, help="task mode (default: the one the model was trained on)")
    ap.add_argument("--seed", type=int, default=12345, help="evaluation problems (training draws from other seeds)")
    ap.add_argument("--budgets", default="0.12,0.25,0.5", help="fractions of the mean prompt + trace length")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"scoring settings: {', '.join(SETTINGS)}")
    ap.add_argument("--no-full", action="store_true", help="skip the full-KV run (another process makes it)")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--query-window", type=int, default=16)
    ap.add_argument("--overrides", default=None, help='compression options over each setting, as JSON: {"score_decay": 1.0}')
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default=None)
    ap.add_argument("--teacher-forced", action="store_true",
                    help="replay the reference traces and score each position's argmax (reads vs the rest) instead "
                         "of greedy solving: for a model whose own answers are not yet exact")
    ap.add_argument("--tag", default="", help="suffix of the output files (parallel processes)")
    ap.add_argument("--merge", nargs="+", default=None, help="join these JSON files instead of running")
    ap.add_argument("--out", default="benchmarks/results")
    return ap


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0])).parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    return run(args)


if __name__ == "__main__":
    main()
