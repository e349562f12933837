"""Routing policies side by side in the cluster simulator: goodput, prefix hits, load balance, latency.

Four seeded traces (math reasoning with 32 samples per problem, multi-turn chat, one hot shared prefix,
on/off bursts) replayed against N simulated compressed-KV workers (scheduler/simulate.py) under
round-robin, power of two choices, SGLang cache_aware, Ray PrefixCacheAffinityRouter, Dynamo's KV cost
and ours (scheduler.policy.CapacityAffinityPolicy), each policy on the very same trace.

Load. A trace's arrival rate is `load` x the cluster's capacity upper bound on it, from the cost model
(`estimate_capacity`'s `ideal_req_s`: every worker decoding a full batch, every reusable prefix computed
once, as one unbounded cache would allow). For math, skewed and bursty that bound is close to what the
simulated cluster sustains. Chat is different: at that rate the sessions' histories overflow each
worker's cache (most pages are reserved by running requests), so even the best policies reach a ~0.70
hit rate instead of the bound's ~0.85 and the cluster saturates; so chat also runs at load 0.5, about
0.8 of what the best policies sustain there.

Writes routing.json and routing.png; pure CPU, about two minutes.

    python -m benchmarks.routing [--workers 8] [--load 0.8] [--scale 1.0] [--traces math,chat@0.5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from benchmarks.provenance import write_result

POLICIES = ["round_robin", "pow2", "sglang_cache_aware", "ray_prefix_affinity", "dynamo_cost", "ours"]
BASELINE_NAMES = POLICIES[:-1]
# Trace sizes at --scale 1 (math: problems of 32 samples; chat: sessions; others: requests).
SIZES = {"math": 160, "chat": 3000, "skewed": 4000, "bursty": 4000}
SIZE_ARG = {"math": "n_problems", "chat": "n_sessions", "skewed": "n", "bursty": "n"}
# The chat trace runs twice: at --load like the others, which its finite caches cannot sustain (see the docstring),
# and at 0.5, about 0.8 of what the best policies sustain there.
RUNS = "math,chat,chat@0.5,skewed,bursty"


def our_knobs(cap: dict, cost) -> dict:
    """CapacityAffinityPolicy's knobs from the cost model and the trace's mean request (no search):
    a cached prompt token saves t_prefill seconds; a request lives mean output x the step time at the
    saturation batch b; a fully loaded worker (b requests decoding) slows each of the new request's decode
    steps by t_decode x (b - 1)."""
    b = cap["batch_ideal"]
    return dict(prefill_tokens_per_s=1.0 / cost.t_prefill_s,
                mean_service_s=cap["mean_output"] * cost.step_s(b, 0) + cap["mean_prompt"] * cost.t_prefill_s,
                balance_s=cap["mean_output"] * cost.t_decode_s * (b - 1))


def make_policy(name: str, knobs: dict, seed: int):
    from zipserve.scheduler.baselines import BASELINES
    from zipserve.scheduler.policy import CapacityAffinityPolicy

    if name == "ours":
        return CapacityAffinityPolicy(seed=seed, **knobs)
    return BASELINES[name](seed=seed)


def evaluate_targets(results: dict) -> dict:
    out = {}
    for trace, res in results.items():
        ours = res["ours"]
        base = {p: res[p] for p in BASELINE_NAMES if p in res}
        best_gp = max(base, key=lambda p: base[p]["goodput_tok_s"])
        best_hit = max(base, key=lambda p: base[p]["hit_rate"])
        t = dict(
            goodput_vs_best_baseline=ours["goodput_tok_s"] / base[best_gp]["goodput_tok_s"],
            best_baseline_goodput=best_gp,
            goodput_ge_best_baseline=ours["goodput_tok_s"] >= base[best_gp]["goodput_tok_s"],
            hit_rate_vs_best_baseline=(ours["hit_rate"] / base[best_hit]["hit_rate"]
                                       if base[best_hit]["hit_rate"] else None),
            hit_rate_gap_points=100 * (base[best_hit]["hit_rate"] - ours["hit_rate"]),
            best_baseline_hit_rate=best_hit,
            hit_rate_within_5pct=ours["hit_rate"] >= 0.95 * base[best_hit]["hit_rate"],
        )
        if "pow2" in base:
            t["goodput_vs_pow2"] = ours["goodput_tok_s"] / base["pow2"]["goodput_tok_s"]
            if trace.partition("@")[0] in ("math", "chat"):
                t["goodput_ge_1.2x_pow2"] = t["goodput_vs_pow2"] >= 1.2
        if trace.partition("@")[0] == "skewed":
            t["imbalance"] = ours["imbalance"]
            t["imbalance_le_1.2"] = ours["imbalance"] is not None and ours["imbalance"] <= 1.2
        out[trace] = t
    return out


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(summary["traces"])
    policies = summary["policies"]
    panels = [("goodput_tok_s", "goodput (output tok/s over makespan) / pow2's", "rel"),
              ("prefill_tokens", "prefill tokens computed / pow2's", "rel"),
              ("hit_rate", "prefix hit rate (tokens)", None),
              ("imbalance", "imbalance (max/mean pages in use)", None),
              ("latency_p99_s", "p99 end-to-end latency (s)", "log"),
              ("ttft_p99_s", "p99 time to first token (s)", "log")]
    fig, axes = plt.subplots(2, 3, figsize=(18, 8.5))
    width = 0.8 / len(policies)
    colors = plt.get_cmap("tab10")
    for ax, (key, label, mode) in zip(axes.flat, panels):
        for j, p in enumerate(policies):
            vals = []
            for tr in traces:
                res = summary["traces"][tr]["results"]
                v = res[p][key]
                if mode == "rel" and v is not None:
                    v = v / res["pow2"][key]
                vals.append(v if v is not None else 0)
            xs = [i + (j - (len(policies) - 1) / 2) * width for i in range(len(traces))]
            ax.bar(xs, vals, width, label=p, color=colors(j), edgecolor="black" if p == "ours" else None)
        ax.set_xticks(range(len(traces)))
        ax.set_xticklabels(traces)
        ax.set_title(label, fontsize=10)
        if mode == "log":
            ax.set_yscale("log")
        if mode == "rel" and key == "goodput_tok_s":
            ax.set_ylim(0.8, 1.2)
            ax.set_title(label + " (axis from 0.8)", fontsize=10)
        if mode == "rel":
            ax.axhline(1.0, color="gray", ls="--", lw=0.8)
        if key == "imbalance":
            ax.set_ylim(bottom=0.9)
            ax.axhline(1.2, color="gray", ls="--", lw=0.8)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(policies), fontsize=9)
    c = summary["config"]
    fig.suptitle(f"Routing policies in the simulator: {c['workers']} workers, offered load (after @, else {c['load']}) "
                 f"x the capacity upper bound "
                 f"(page {c['worker']['block_size']}, budget {c['worker']['budget_blocks']} pages)")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--load", type=float, default=0.8, help="arrival rate as a fraction of the capacity upper bound")
    ap.add_argument("--scale", type=float, default=1.0, help="trace sizes x this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-interval", type=float, default=0.1, help="seconds between worker reports")
    ap.add_argument("--traces", default=RUNS, help="comma-separated runs: a trace name (" + ",".join(SIZES) + "), "
                    "optionally @LOAD to override --load (default: %(default)s)")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset of " + ",".join(POLICIES))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return ap


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.routing", description=__doc__.splitlines()[0])
    return add_arguments(ap)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from zipserve.scheduler.simulate import CostModel, Simulator, WorkerConfig, estimate_capacity
    from zipserve.scheduler.traces import TRACES

    runs = []  # (label, trace name, load)
    for item in (t for t in args.traces.split(",") if t):
        name, _, load = item.partition("@")
        if name not in TRACES:
            raise SystemExit(f"unknown trace {name!r}")
        runs.append((item, name, float(load) if load else args.load))
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        if p not in POLICIES:
            raise SystemExit(f"unknown policy {p!r}")
    worker, cost = WorkerConfig(), CostModel()
    t_start = time.perf_counter()
    summary = dict(benchmark="routing", host=platform.node(), python=platform.python_version(), policies=policies,
                   config=dict(workers=args.workers, load=args.load, scale=args.scale, seed=args.seed,
                               report_interval_s=args.report_interval, worker=asdict(worker), cost=asdict(cost)),
                   traces={})
    for label, name, load in runs:
        size = max(1, round(SIZES[name] * args.scale))
        make = TRACES[name]
        cap = estimate_capacity(make(**{SIZE_ARG[name]: size}, rate=1.0, seed=args.seed), args.workers, worker, cost)
        knobs = our_knobs(cap, cost)
        rate = load * cap["ideal_req_s"]
        trace = make(**{SIZE_ARG[name]: size}, rate=rate, seed=args.seed)
        print(f"{label}: {len(trace)} requests at {rate:.1f} req/s = {load} x the capacity upper bound "
              f"{cap['ideal_req_s']:.1f} req/s (without prefix reuse: {cap['no_cache_req_s']:.1f})", flush=True)
        entry = dict(trace=name, requests=len(trace), size={SIZE_ARG[name]: size}, load=load, rate_req_s=rate,
                     capacity=cap, load_vs_no_cache_capacity=rate / cap["no_cache_req_s"], our_knobs=knobs,
                     results={})
        for p in policies:
            res = Simulator(trace, make_policy(p, knobs, args.seed), n_workers=args.workers, worker=worker, cost=cost,
                            report_interval_s=args.report_interval).run()
            entry["results"][p] = res
            print(f"  {p:20s} goodput {res['goodput_tok_s']:8.0f} tok/s {res['goodput_req_s']:7.2f} req/s  "
                  f"hit {res['hit_rate']:.3f}  imbalance {res['imbalance']:.3f}  p99 {res['latency_p99_s']:7.2f} s  "
                  f"ttft p99 {res['ttft_p99_s']:6.2f} s  ({res['sim_wall_s']:.1f} s)", flush=True)
        summary["traces"][label] = entry
    if "ours" in policies and any(p in policies for p in BASELINE_NAMES):
        summary["targets"] = evaluate_targets({t: e["results"] for t, e in summary["traces"].items()})
    summary["runtime_s"] = time.perf_counter() - t_start
    os.makedirs(args.out, exist_ok=True)
    write_result(os.path.join(args.out, "routing.json"), summary, indent=2)
    if "pow2" in policies:
        plot(summary, os.path.join(args.out, "routing.png"))
    if "targets" in summary:
        print(json.dumps(summary["targets"], indent=2))
    print(f"runtime {summary['runtime_s']:.0f} s; wrote {os.path.join(args.out, 'routing.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
