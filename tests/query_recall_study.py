"""What a per-step (query-time) recall of evicted KV could buy on the task models: an upper bound.

    python -m tests.query_recall_study --model benchmarks/quality/models/registers --problems 32 \
        --budget 0.25 --settings 4:0,4:1 --workers 2

It lives beside the oracle it measures (tests/ is absent from an installed package, which the benchmarks
must not depend on) and runs from a checkout; it writes to benchmarks/results like a benchmark.

Issue 27's recall decides at each compression, from the query window; on the `registers` task the value a
line reads next sits in a register nobody has read lately, which that window cannot point at. This study
asks whether a decision made from each decode step's own query could: the dense reference
(tests/dense_reference.py, the policy's oracle) with `query_pages` attends, at every decode step and per
layer and KV head, over the resident cache plus the stored pages of highest Quest bound for that step's
query (`lag` 0: chosen by the same step, a recall that lands at once; 1: chosen by the previous step, a
recall decided at the end of a step and landed before the next). The chosen pages come on top of the
budget (with --within-budget the cache keeps that many pages fewer, so resident + recalled fit the budget),
so this bounds from above what such a recall can reach; it is not the engine. Each setting is
`pages:lag`; 0:0 is the policy without recall, and full KV runs too (--no-full skips it). CPU, fp32,
greedy until <eos>, one process per worker over the problems.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from benchmarks.provenance import write_result
from benchmarks.quality.task import check, encode, generate
from benchmarks.quality.task_accuracy import trained_args, trained_mode

log = logging.getLogger("tests.query_recall_study")


def _solve(job: tuple) -> list[dict]:
    """One worker: its share of the problems under one setting (pages None: full KV)."""
    from transformers import AutoTokenizer

    from tests.dense_reference import DenseCompressedReference
    from zipserve.workers.config import CompressionConfig

    model, problems, block_size, budget, pages, lag, newest_of = job
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model)
    ref = DenseCompressedReference(model, block_size, budget, CompressionConfig(), query_pages=pages or 0,
                                   query_lag=lag, query_newest_of=newest_of)
    rows = []
    for i, p in problems:
        ids = ref.generate(encode(tokenizer, p.prompt), len(p.trace) + 16, stop_token=tokenizer.eos_token_id)
        grade = check(p, tokenizer.decode(ids, skip_special_tokens=True))
        rows.append({"problem": i, "correct": grade["correct"], "correct_steps": grade["correct_steps"],
                     "steps": grade["steps"], "selections": ref.query_selections, "page_loads": ref.query_page_loads})
    return rows


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    mode = trained_mode(args.model)
    registers = trained_args(args.model).get("registers", 10)
    problems = generate(args.problems, args.min_steps, args.max_steps, registers, seed=args.seed, mode=mode)
    mean_len = sum(len(p.prompt) + len(p.trace) + 1 for p in problems) / len(problems)
    blocks = max(1, round(args.budget * mean_len / args.block_size))
    settings = [(None, 0)] * (not args.no_full) + [tuple(int(x) for x in s.split(":")) for s in args.settings.split(",")]
    results = {"benchmark": "query_recall", "model": os.path.basename(args.model.rstrip("/")), "device": "cpu",
               "mode": mode, "problems": len(problems), "steps": [args.min_steps, args.max_steps], "seed": args.seed,
               "block_size": args.block_size, "budget_fraction": args.budget, "budget_blocks": blocks,
               "mean_tokens": mean_len, "runs": []}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"query_recall_{results['model']}{args.tag}")
    indexed = list(enumerate(problems))
    shares = [indexed[w:: args.workers] for w in range(args.workers)]
    for pages, lag in tqdm(settings, desc="query recall", unit="setting"):
        t = time.perf_counter()
        with ProcessPoolExecutor(args.workers) as pool:
            cache = None if pages is None else blocks - pages * args.within_budget
            rows = [r for part in pool.map(_solve, [(args.model, s, args.block_size, cache, pages, lag, args.newest_of)
                                                 for s in shares])
                    for r in part]
        rows.sort(key=lambda r: r["problem"])
        label = "full KV" if pages is None else (f"{pages} pages, lag {lag}" + (f", cache {cache}" if args.within_budget else "")
                                                 + (f", newest of {args.newest_of}" if args.newest_of else ""))
        row = {"setting": label, "query_pages": pages, "newest_of": args.newest_of,
               "lag": lag, "cache_blocks": cache, "accuracy": sum(r["correct"] for r in rows) / len(rows),
               "mean_correct_step_fraction": sum(r["correct_steps"] / r["steps"] for r in rows) / len(rows),
               "seconds": time.perf_counter() - t, "per_problem": [r["correct"] for r in rows],
               # what a per-step recall would copy: pages not chosen at the step before, per (layer, head) choice
               "page_loads_per_selection": sum(r["page_loads"] for r in rows) / max(1, sum(r["selections"] for r in rows))}
        results["runs"].append(row)
        log.info("%-18s accuracy %.3f (%.0f s)", row["setting"], row["accuracy"], row["seconds"])
        full = next((r["accuracy"] for r in results["runs"] if r["query_pages"] is None), None)
        for r in results["runs"]:
            if full:
                r["of_full_kv"] = r["accuracy"] / full
        write_result(stem + ".json", results, indent=1)
    plot(results, stem + ".png")
    return results


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    runs = results["runs"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(runs), 4))
    ax.bar(range(len(runs)), [r["accuracy"] for r in runs], color=["grey" if r["query_pages"] is None else "C0" for r in runs])
    ax.set_xticks(range(len(runs)), [r["setting"].replace(", ", "\n") for r in runs])
    ax.set(ylabel="exact-answer accuracy", ylim=(0, 1),
           title=f"{results['model']}: per-step recall at a {100 * results['budget_fraction']:.0f}% budget "
                 f"({results['problems']} problems, dense reference)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--model", default="benchmarks/quality/models/registers")
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--min-steps", type=int, default=100)
    ap.add_argument("--max-steps", type=int, default=250)
    ap.add_argument("--seed", type=int, default=12345, help="evaluation problems (training draws from other seeds)")
    ap.add_argument("--budget", type=float, default=0.25, help="a fraction of the mean prompt + trace length")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--settings", default="0:0,4:0,4:1", help="pages:lag, comma-separated")
    ap.add_argument("--no-full", action="store_true", help="skip the full-KV run")
    ap.add_argument("--within-budget", action="store_true",
                    help="the cache keeps `pages` pages fewer than the budget (resident + recalled = the budget)")
    ap.add_argument("--newest-of", type=int, default=0,
                    help="recall the `pages` newest of this many pages of highest bound (0: the highest)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--plot", help="only redraw the PNG of this result JSON")
    return ap


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0])).parse_args(argv)
    if args.plot:
        with open(args.plot) as f:
            plot(json.load(f), args.plot.replace(".json", ".png"))
        return
    run(args)


if __name__ == "__main__":
    main()
