"""Does compression overlap decode? A profiler trace of the engine with compressions in flight.

Runs a long-reasoning batch on a real model shape (random weights) with a KV budget, records a
window of steps with torch.profiler, and from the kernel timeline reports: the compressor stream's
kernel time, how much of it ran while main-stream (decode) kernels were running, and the compression
share of step time. Needs CUDA.

    python -m benchmarks.compression_overlap [--shape qwen3-1.7b] [--requests 64]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time

import torch
from benchmarks.provenance import write_result


def _merge(intervals):
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def _overlap(a, b):
    """Total length of the intersection of two merged interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, e - s)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-1.7b")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--budget", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--warm-steps", type=int, default=900)
    ap.add_argument("--profile-steps", type=int, default=60)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    from benchmarks.decode_step import config_folder
    from zipserve.workers import LLM, SamplingParams

    llm = LLM(config_folder(args.shape), load_format="dummy", block_size=args.block_size, budget_blocks=args.budget,
              max_num_seqs=args.requests, max_num_batched_tokens=8192, max_model_len=8192,
              num_blocks=args.requests * (args.budget + 1) + 64)
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)
    for i in range(args.requests):  # staggered prompt lengths: compressions spread over the steps
        eng.add_request(f"r{i}", [(i * 31 + j) % 1000 + 5 for j in range(64 + 37 * i % 700)], params)
    for _ in range(args.warm_steps):  # every request has compressed at least once by now
        eng.step()
    torch.cuda.synchronize()
    before = eng.stats()["compressions"]
    trace = os.path.join(tempfile.mkdtemp(), "trace.json")
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.profile_steps):
            eng.step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    prof.export_chrome_trace(trace)
    compressions = eng.stats()["compressions"] - before
    with open(trace) as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    # The compressor's stream is the one running the compression kernels (kernels/compress.py).
    compress_names = re.compile(r"window_att|redund|score|select|compact|topk|radix")
    by_stream, names = {}, {}
    for e in kernels:
        st = e["args"].get("stream")
        by_stream.setdefault(st, []).append((e["ts"], e["ts"] + e["dur"]))
        names.setdefault(st, set()).add(e["name"])
    cs = next((st for st, ns in names.items() if any(compress_names.search(n) for n in ns)), None)
    comp = _merge(by_stream.get(cs, []))
    main_k = _merge([iv for s, ivs in by_stream.items() if s != cs for iv in ivs])
    comp_us = sum(e - s for s, e in comp)
    main_us = sum(e - s for s, e in main_k)
    overlap_us = _overlap(comp, main_k)
    span_us = (max(e for _, e in main_k + comp) - min(s for s, _ in main_k + comp)) if kernels else 0.0
    result = {
        "benchmark": "compression_overlap", "device": torch.cuda.get_device_name(), "shape": args.shape,
        "requests": args.requests, "budget_blocks": args.budget, "block_size": args.block_size,
        "profiled_steps": args.profile_steps, "compressions_in_window": compressions, "streams": sorted(map(str, by_stream)),
        "compress_stream": cs, "compress_kernels": sorted(names.get(cs, [])),
        "compress_kernel_ms": comp_us / 1e3, "decode_kernel_ms": main_us / 1e3,
        "overlapped_ms": overlap_us / 1e3, "overlap_fraction_of_compression": overlap_us / comp_us if comp_us else 0.0,
        "compression_share_of_gpu_time": comp_us / (comp_us + main_us) if comp_us + main_us else 0.0,
        "kernel_span_ms": span_us / 1e3, "wall_ms": wall * 1e3, "mean_step_ms": wall * 1e3 / args.profile_steps,
        "mean_compression_ms_host": eng.stats()["mean_compression_ms"],
    }
    os.makedirs(args.out, exist_ok=True)
    write_result(os.path.join(args.out, "compression_overlap.json"), result, indent=2)
    _plot(result, os.path.join(args.out, "compression_overlap.png"))
    print(json.dumps(result, indent=2))
    return result


def _plot(r, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the JSON is the record
        return
    fig, ax = plt.subplots(figsize=(7, 3))
    alone = r["compress_kernel_ms"] - r["overlapped_ms"]
    ax.barh(["decode (main stream)"], [r["decode_kernel_ms"]], color="tab:blue")
    ax.barh(["compression (own stream)"], [r["overlapped_ms"]], color="tab:green", label="while decode kernels ran")
    ax.barh(["compression (own stream)"], [alone], left=[r["overlapped_ms"]], color="tab:red", label="alone")
    ax.set(xlabel=f"kernel time over {r['profiled_steps']} steps (ms)",
           title=f"{r['shape']} x{r['requests']} requests, budget {r['budget_blocks']}x{r['block_size']}, {r['device']}: "
                 f"{100 * r['overlap_fraction_of_compression']:.0f}% of compression overlapped")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--plot":  # redraw a result JSON
        with open(sys.argv[2]) as f:
            _plot(json.load(f), sys.argv[2].removesuffix(".json") + ".png")
    else:
        main()
