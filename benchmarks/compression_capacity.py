"""How many long-reasoning requests fit in one KV pool: full KV vs Compressed PagedAttention.

Same tiny random model (built offline), same pool of pages, same workload (N requests, short prompts,
long fixed outputs with ignore_eos). For each system: the peak pages one request holds, the peak number
of requests running at once (full KV admits greedily, then preempts and recomputes), preemptions,
compressions, and engine steps to finish (fewer steps = more requests decoded per forward pass). Runs on
CPU in about five minutes.

    python -m benchmarks.compression_capacity [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

from tqdm.auto import tqdm
from benchmarks.provenance import write_result


def run_system(path: str, name: str, config: dict, prompts: list[list[int]], max_tokens: int) -> dict:
    from zipserve.workers import LLM, SamplingParams

    llm = LLM(path, **config)
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"{name}-{i}", p, params)
    peak_pages, peak_running, used_trace, running_trace = 0, 0, [], []
    t0 = time.perf_counter()
    with tqdm(total=len(prompts), desc=name, unit="req", mininterval=5) as bar:
        while eng.has_unfinished_requests():
            for out in eng.step():
                bar.update(int(out.finished))
            s = eng.stats()
            for seq in eng.scheduler.running:
                peak_pages = max(peak_pages, len(seq.block_table))
            peak_running = max(peak_running, s["running"])
            used_trace.append(s["used_pages"])
            running_trace.append(s["running"])
    s = eng.stats()
    return {
        "system": name, "config": config, "seconds": time.perf_counter() - t0, "steps": s["steps"],
        "peak_pages_per_request": peak_pages, "peak_running": peak_running,
        "mean_running": sum(running_trace) / len(running_trace), "preemptions": s["preemptions"],
        "requests_that_fit": config["num_blocks"] // peak_pages,
        "compressions": s.get("compressions", 0), "generated_tokens": s["generated_tokens"],
        "tokens_per_step": s["generated_tokens"] / s["steps"], "running_trace": running_trace,
        "used_pages_trace": used_trace,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--budget", type=int, default=4)
    ap.add_argument("--pages", type=int, default=256)
    args = ap.parse_args(argv)
    from zipserve.workers.models.random_folder import build_model_folder

    path = build_model_folder(tempfile.mkdtemp(), "qwen3", max_pos=4096)
    system = list(range(3, 3 + 40))
    prompts = [system + [(i * 13 + j) % 250 + 3 for j in range(8 + i % 24)] for i in range(args.requests)]
    common = dict(block_size=args.block_size, num_blocks=args.pages, max_num_seqs=args.requests,
                  max_num_batched_tokens=512)
    results = [
        run_system(path, "full-kv", dict(common), prompts, args.max_tokens),
        run_system(path, f"compressed-B{args.budget}", dict(common, budget_blocks=args.budget,
                                                            compression=dict(query_window=8)), prompts, args.max_tokens),
    ]
    full, comp = results
    summary = {
        "benchmark": "compression_capacity", "machine": platform.processor() or platform.machine(), "device": "cpu",
        "workload": {"requests": args.requests, "prompt_tokens": [len(p) for p in prompts], "max_tokens": args.max_tokens,
                     "block_size": args.block_size, "pool_pages": args.pages, "budget_blocks": args.budget},
        "results": [{k: v for k, v in r.items() if not k.endswith("_trace")} for r in results],
        "ratios": {
            "requests_that_fit": comp["requests_that_fit"] / full["requests_that_fit"],
            "mean_running": comp["mean_running"] / full["mean_running"],
            "peak_pages_per_request": comp["peak_pages_per_request"] / full["peak_pages_per_request"],
            "tokens_per_step": comp["tokens_per_step"] / full["tokens_per_step"],
            "steps": comp["steps"] / full["steps"],
        },
    }
    os.makedirs(args.out, exist_ok=True)
    write_result(os.path.join(args.out, "compression_capacity.json"), summary, indent=2)
    _plot(results, os.path.join(args.out, "compression_capacity.png"), summary)
    print(json.dumps(summary["ratios"], indent=2))
    for r in summary["results"]:
        print(f"{r['system']:>16}: peak pages/request {r['peak_pages_per_request']:4d}  fit {r['requests_that_fit']:3d}  "
              f"mean running {r['mean_running']:.1f}  "
              f"steps {r['steps']:5d}  tokens/step {r['tokens_per_step']:.1f}  preemptions {r['preemptions']}  "
              f"compressions {r['compressions']}")
    return summary


def _plot(results, path, summary):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        axes[0].plot(r["running_trace"], label=r["system"])
        axes[1].plot(r["used_pages_trace"], label=r["system"])
    w = summary["workload"]
    axes[0].set(title="requests running at once", xlabel="engine step", ylabel="requests")
    axes[1].set(title=f"pages in use (pool {w['pool_pages']} x {w['block_size']} tokens)", xlabel="engine step",
                ylabel="pages")
    for ax in axes:
        ax.legend()
    fig.suptitle(f"{w['requests']} requests x {w['max_tokens']} output tokens: compressed fits "
                 f"{summary['ratios']['requests_that_fit']:.1f}x more requests, finishes in {summary['ratios']['steps']:.2f}x the steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
