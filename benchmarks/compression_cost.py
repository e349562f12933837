"""Compression cost per request on a real model shape: plan by plan against batched, with the memory floor.

N requests are due at once, each with a cache of budget + 1 pages of random K/V, query windows and global
scores (a later compression: global scores decayed and carried), compressed into its first budget pages.
One Compressor.run of the N plans is timed with CUDA events (warm-up runs first, then the median of
`--reps`), plan by plan (`batched=False`), batched, and batched replaying captured CUDA graphs (`graphs`,
CUDA only); the torch profiler counts what one run launches (kernels and copies) and splits their time by
phase (by kernel name; torch's indexing kernels all count as the gather). Each phase's floor is the bytes
it must move (every tensor it reads or writes, once) over the card's measured copy bandwidth.

    python -m benchmarks.compression_cost [--shape qwen3-8b] [--requests 1,16,64,256] [--budget 8] \
        [--block-size 256] [--scoring default] [--batch-tokens 40960]

Needs CUDA. `--device cpu` runs the same logic at a tiny shape (`--shape tiny`): a check that it executes,
not a measurement (no events, no kernel counts).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from types import SimpleNamespace

import torch
from benchmarks.provenance import write_result

SHAPES = {  # layers, KV heads, query heads, head dim
    "qwen3-8b": dict(layers=36, kv_heads=8, heads=32, head_dim=128),
    "tiny": dict(layers=3, kv_heads=2, heads=4, head_dim=16),
}
SCORING = {
    "default": {},
    "paper-set": dict(use_redundancy=True, use_pooling=True, recent_fraction=0.0),
}
PHASES = (  # (phase, substrings of kernel names), first match wins
    ("scores", ("_win_stats", "_win_probs", "_red_latest", "_red_rows", "_softmax_rows", "_scores_finish")),
    ("select", ("_topk",)),
    ("compact", ("_compact_gather", "_compact_write")),
    ("score cache", ("scatter_gather", "index_put")),
    ("gather", ("index", "gather", "copy", "memcpy", "Memcpy")),
)


def phase_of(name: str) -> str:
    return next((p for p, keys in PHASES if any(k in name for k in keys)), "other")


def bandwidth(device: torch.device) -> float:
    """Measured copy bandwidth in bytes/s (bytes read + bytes written)."""
    if device.type == "cuda":
        from benchmarks.decode_step import copy_bandwidth

        return copy_bandwidth(device)
    x = torch.empty(1 << 26, dtype=torch.uint8).random_()
    y = torch.empty_like(x)
    y.copy_(x)
    t = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    return 2 * x.numel() * 5 / (time.perf_counter() - t)


def floor_bytes(sh: dict, n: int, keep: int, num_scored: int, Q: int, elt: int) -> dict:
    """Bytes one compression must move, by phase (each tensor read or written once)."""
    L, H, Hq, D = sh["layers"], sh["kv_heads"], sh["heads"], sh["head_dim"]
    return {
        "gather": 2 * L * n * H * D * elt + 2 * L * Q * Hq * D * elt + 2 * L * num_scored * H * 4,  # copies
        "scores": L * n * H * D * elt + L * Q * Hq * D * elt + L * H * num_scored * 4 + 2 * L * H * n * 4,
        "select": L * H * n * 4 + L * H * keep * 8,
        "compact": 2 * 2 * L * keep * H * D * elt,  # K and V: kept entries read, destination written
        "score cache": 2 * L * H * keep * 4 + L * H * keep * 8,  # kept G read, indices read, pages written
    }


def make_compressor(sh, args, num_requests, device, dtype):
    from zipserve.workers.compressor import Compressor
    from zipserve.workers.config import CompressionConfig

    bs, pages = args.block_size, args.budget + 1
    cfg = CompressionConfig(query_window=args.window, **SCORING[args.scoring])
    L, H, Hq, D = sh["layers"], sh["kv_heads"], sh["heads"], sh["head_dim"]
    g = torch.Generator(device=device).manual_seed(0)
    kv = torch.randn(2, L, num_requests * pages, bs, H, D, device=device, dtype=dtype, generator=g)
    q_win = torch.randn(L, num_requests + 1, args.window, Hq, D, device=device, dtype=dtype, generator=g)
    scores = torch.rand(L, num_requests * pages, bs, H, device=device, generator=g) if cfg.use_global_score else None
    backend = args.backend or ("triton" if device.type == "cuda" else "torch")
    return Compressor(cfg, kv, q_win, scores, bs, D**-0.5, backend=backend, max_batch_tokens=args.batch_tokens)


def make_plans(args, num_requests):
    from zipserve.workers.block_manager import CompactionPlan

    bs, pages, keep = args.block_size, args.budget + 1, args.budget * args.block_size
    plans = []
    for r in range(num_requests):
        seq = SimpleNamespace(request_id=f"r{r}", window_slot=r, num_prompt_tokens=100)
        src = list(range(r * pages, (r + 1) * pages))
        # dest: the request's own pages, the working page first (it reads pages it overwrites)
        plans.append(CompactionPlan(seq, src, [src[-1]] + src[: args.budget - 1] + [src[-2]], [], pages * bs, keep,
                                    0, keep, False))
    return plans


def time_run(comp, plans, device, warm: int, reps: int) -> tuple[float, float]:
    """(median ms of one run of all the plans, median host ms to launch it)."""
    for _ in range(warm):
        comp.run(plans)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    times, host = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            comp.run(plans)
            e.record()
            host.append(1e3 * (time.perf_counter() - t0))
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        else:
            comp.run(plans)
            host.append(1e3 * (time.perf_counter() - t0))
            times.append(host[-1])
    return sorted(times)[len(times) // 2], sorted(host)[len(host) // 2]


def profile_run(comp, plans) -> dict:
    """Kernels one run launches, and their GPU time by phase (ms)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        comp.run(plans)
        torch.cuda.synchronize()
    count, by_phase = 0, {}
    for ev in prof.events():
        if ev.device_type.name != "CUDA" or ev.device_time <= 0:
            continue
        count += 1
        p = phase_of(ev.name)
        by_phase[p] = by_phase.get(p, 0.0) + ev.device_time / 1e3
    if not count:
        raise RuntimeError("the profiler recorded no GPU kernels (CUPTI unavailable?)")
    return {"kernels": count, "kernel_ms_by_phase": dict(sorted(by_phase.items(), key=lambda x: -x[1]))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: qwen3-8b (tiny on the CPU)")
    ap.add_argument("--requests", default=None, help="comma-separated N (default 1,16,64,256; 1,4 on the CPU)")
    ap.add_argument("--budget", type=int, default=None, help="pages kept per request (default 8; 2 on the CPU)")
    ap.add_argument("--block-size", type=int, default=None, help="default 256 (8 on the CPU)")
    ap.add_argument("--window", type=int, default=None, help="query window (default 16; 4 on the CPU)")
    ap.add_argument("--scoring", default="default", choices=sorted(SCORING))
    ap.add_argument("--backend", default=None, choices=("torch", "triton"), help="default: triton on CUDA")
    ap.add_argument("--batch-tokens", type=int, default=40960,
                    help="the compressor's max_batch_tokens (the engine's: 4 x (budget + 1) x block_size); 0: no cap")
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    args.shape = args.shape or ("tiny" if cpu else "qwen3-8b")
    args.requests = args.requests or ("1,4" if cpu else "1,16,64,256")
    args.budget = args.budget or (2 if cpu else 8)
    args.block_size = args.block_size or (8 if cpu else 256)
    args.window = args.window or (4 if cpu else 16)
    args.batch_tokens = args.batch_tokens or None
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("needs CUDA (or --device cpu for a smoke run at a tiny shape)")
    device = torch.device(args.device)
    dtype = torch.float32 if cpu else torch.bfloat16
    sh = SHAPES[args.shape]
    bw = bandwidth(device)
    n, keep = (args.budget + 1) * args.block_size, args.budget * args.block_size
    floor = {p: b / bw * 1e3 for p, b in floor_bytes(sh, n, keep, keep, args.window, dtype.itemsize).items()}
    card = torch.cuda.get_device_name(device) if not cpu else "cpu"
    results = {"benchmark": "compression_cost", "device": card, "shape": args.shape, **sh,
               "block_size": args.block_size, "budget_blocks": args.budget, "query_window": args.window,
               "kv_len": n, "keep": keep, "scoring": args.scoring, "batch_tokens": args.batch_tokens,
               "copy_bandwidth_GBps": bw / 1e9, "floor_ms_per_compression_by_phase": floor,
               "floor_ms_per_compression": sum(floor.values()), "rows": []}
    for N in [int(x) for x in args.requests.split(",")]:
        comp = make_compressor(sh, args, N, device, dtype)
        plans = make_plans(args, N)
        for mode in ("per-request", "batched") + (() if cpu else ("graphs",)):
            comp.batched = mode != "per-request"
            if mode == "graphs":  # replays of captured batches of 4, 2 and 1 (its warm-up writes pages 0 .. budget)
                comp.capture_graphs(args.budget, N, sizes=(1, 2, 4), stream=torch.cuda.Stream(device))
            ms, host_ms = time_run(comp, plans, device, args.warm, args.reps)
            row = {"requests": N, "mode": mode, "run_ms": ms, "ms_per_compression": ms / N,
                   "host_ms_per_compression": host_ms / N, "fraction_of_floor": sum(floor.values()) / (ms / N),
                   "batches": len(comp._batches(list(range(N)), n)) if comp.batched else N}
            if not cpu:
                prof = profile_run(comp, plans)
                row |= {"kernels_per_compression": prof["kernels"] / N,
                        "kernel_ms_per_compression_by_phase": {k: v / N for k, v in prof["kernel_ms_by_phase"].items()}}
            results["rows"].append(row)
            print(f"N={N:4d} {mode:>11}: {row['ms_per_compression']:8.3f} ms per compression "
                  f"(host {row['host_ms_per_compression']:.3f} ms), floor {results['floor_ms_per_compression']:.3f} ms"
                  + (f", {row['kernels_per_compression']:.1f} kernels each" if not cpu else ""), flush=True)
        del comp
        if not cpu:
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    from benchmarks.decode_step import card_tag

    name = f"compression_cost_{args.shape}_{'cpu' if cpu else card_tag(card)}"
    write_result(os.path.join(args.out, f"{name}.json"), results, indent=2)
    _plot(results, os.path.join(args.out, f"{name}.png"))
    return results


def _plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the GPU image may lack matplotlib: the JSON is the record
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in ("per-request", "batched", "graphs"):
        rows = [r for r in results["rows"] if r["mode"] == mode]
        ax.plot([r["requests"] for r in rows], [r["ms_per_compression"] for r in rows], "o-", label=mode)
    ax.axhline(results["floor_ms_per_compression"], color="k", ls="--", label="memory floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="requests due at once", ylabel="ms per compression",
           title=f"{results['shape']}, {results['kv_len']} -> {results['keep']} entries, {results['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--plot":  # redraw a result JSON (the GPU image lacks matplotlib)
        with open(sys.argv[2]) as f:
            _plot(json.load(f), sys.argv[2].removesuffix(".json") + ".png")
    else:
        main()
