"""Where an engine step's time goes at a serving batch: host phases, GPU kernels by kind, and the forward alone.

B requests start at contexts spread over [context - spread, context] (so that, compressed, about B / page
requests reach a page boundary per step, as in a steady state), then decode with the serving benchmarks'
sampling (temperature 0.6, top-p 0.95 by default). Over --steps decode steps it records:

- wall time per step (the engine's `step()` as a server calls it);
- host time per phase (schedule, build and launch the forward, launch sampling, append the step before's
  tokens, plan and launch compressions, land them) and the time the host sat waiting for the GPU (a host
  that never waits is the bottleneck; one that waits most of the step leaves the GPU the bottleneck);
- GPU kernel time per step by kind (torch profiler), split into main-stream and compression-stream work;
- the forward alone, replayed from its CUDA graph at the same batch and context (benchmarks.decode_step).

    python -m benchmarks.engine_step --shape qwen3-8b --batch 256 --context 1024 --systems full,compressed
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import functools
import gc
import os
import random
import statistics
import time

import torch

from benchmarks.decode_step import SHAPES, card_tag, config_folder, copy_bandwidth, kernel_kind, kernel_times, time_decode
from benchmarks.provenance import write_result

SAMPLING_KERNELS = ("sort", "radix", "scan", "cumsum", "searchsorted", "softmax", "argmax", "cub", "exponential",
                    "div", "masked_fill", "scatter", "isfinite", "bitonic")


def _kind(name: str) -> str:
    low = name.lower()
    if "gemm" not in low and "nvjet" not in low and any(k in low for k in SAMPLING_KERNELS):
        return "sampling and small ops"
    return kernel_kind(name)


class PhaseTimer:
    """Host seconds spent inside wrapped callables, by phase (only while `on`)."""

    def __init__(self):
        self.on = False
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, attr: str, phase: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*a, **k):
            if not self.on:
                return fn(*a, **k)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t

        setattr(owner, attr, timed)


def gpu_busy_ms(events) -> float:
    """Milliseconds in which at least one of these profiler events (kernels, copies) ran on the device (the
    union of their intervals): step time beyond it is the GPU waiting (for the host, or between kernels)."""
    spans = sorted((ev.time_range.start, ev.time_range.end) for ev in events
                   if ev.device_type.name == "CUDA" and ev.device_time > 0)
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if e > end:
            busy += e - max(s, end)
            end = e
    return busy / 1e3


def gpu_gaps(kernels: list[tuple[str, float, float]], short_us: float = 10.0, top: int = 8) -> dict:
    """Where the device sat idle between work (name, start, end in microseconds; all streams merged): gaps up
    to `short_us` are kernel boundaries (launch latency, even inside a CUDA graph), longer ones the device
    waiting for the host. The long ones are named by the work either side, the largest totals first."""
    spans = sorted(kernels, key=lambda k: k[1])
    short = [0, 0.0]
    long: dict[str, list[float]] = {}
    end, last = None, None
    for name, s, e in spans:
        if end is not None and s > end:
            gap = s - end
            if gap <= short_us:
                short[0] += 1
                short[1] += gap
            else:
                t = long.setdefault(f"{last[:60]} -> {name[:60]}", [0, 0.0])
                t[0] += 1
                t[1] += gap
        if end is None or e > end:
            end, last = e, name
    longest = sorted(long.items(), key=lambda x: -x[1][1])[:top]
    return {"short_gaps": short[0], "short_gap_ms": short[1] / 1e3,
            "long_gaps": sum(v[0] for v in long.values()), "long_gap_ms": sum(v[1] for v in long.values()) / 1e3,
            "long_gaps_between": {k: [int(v[0]), round(v[1] / 1e3, 4)] for k, v in longest}}


def overlap_slowdown_ms(main: list[tuple[str, float, float]], side: list[tuple[float, float]]) -> tuple[float, int]:
    """Time side-stream work added to the main stream's kernels it ran beside: each main kernel (name, start,
    end in microseconds) that overlaps a side interval counts its duration beyond the median of the same
    kernel's runs that overlapped nothing. Returns (milliseconds, overlapped kernels with no clean run to
    compare with, left uncounted)."""
    merged: list[list[float]] = []
    for s, e in sorted(side):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    starts = [m[0] for m in merged]

    def overlaps(s: float, e: float) -> bool:
        i = bisect.bisect_right(starts, e) - 1  # the last side interval starting at or before e
        return i >= 0 and merged[i][1] > s

    clean: dict[str, list[float]] = {}
    hit: list[tuple[str, float]] = []
    for name, s, e in main:
        (hit.append((name, e - s)) if overlaps(s, e) else clean.setdefault(name, []).append(e - s))
    excess, unknown = 0.0, 0
    for name, d in hit:
        if name in clean:
            excess += max(0.0, d - statistics.median(clean[name]))
        else:
            unknown += 1
    return excess / 1e3, unknown


def top_kernels(prof, steps: int, n: int = 30) -> list[tuple[str, float, float]]:
    """The n kernels of most GPU time: (name, ms per step, launches per step)."""
    total: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type.name == "CUDA" and ev.device_time > 0:
            t = total.setdefault(ev.name[:120], [0.0, 0])
            t[0] += ev.device_time / 1e3 / steps
            t[1] += 1 / steps
    return [(k, round(v[0], 4), round(v[1], 2)) for k, v in sorted(total.items(), key=lambda x: -x[1][0])[:n]]


def run_system(system: str, a, path: str, bandwidth: float) -> dict:
    from zipserve.workers import LLM, SamplingParams

    compressed = system == "compressed"
    bs = a.block_size
    max_tokens = a.warm_steps + a.steps + 32  # (the profiled steps come after the timed ones)
    max_len = a.context + max_tokens + bs
    llm = LLM(path, load_format="dummy", block_size=bs, max_num_seqs=a.batch, max_model_len=max_len,
              budget_blocks=a.budget if compressed else None)
    eng = llm.engine
    if a.top_p_by != "rejection":  # the A/B: the nucleus drawn after masking it by a threshold (kernel or sort)
        from zipserve.kernels.sampling import inverse_cdf, top_p_threshold_ref

        threshold = top_p_threshold_ref if a.top_p_by == "sort" else eng.runner.kernels.top_p_threshold

        def by_threshold(logits, temperature, top_p, u):
            x = logits.float() / temperature[:, None]
            probs = x.masked_fill(x < threshold(x, top_p)[:, None], float("-inf")).softmax(-1)
            return inverse_cdf(probs, u[:, 0]), ~torch.isfinite(probs).all(-1)

        eng.runner.kernels = dataclasses.replace(eng.runner.kernels, sample_top_p=by_threshold)
    if compressed and a.compression == "eager":  # the A/B: every compression launched kernel by kernel
        eng.runner.compressor.graphs.clear()
    rng = random.Random(0)
    vocab = eng.model_args.vocab_size
    params = SamplingParams(temperature=a.temperature, top_p=a.top_p, max_tokens=max_tokens, ignore_eos=True)
    for i in range(a.batch):
        n = a.context - (a.spread * i) // a.batch
        eng.add_request(str(i), [rng.randrange(10, vocab) for _ in range(n)], params)
    t0 = time.perf_counter()
    started = set()
    while len(started) < a.batch:  # prefill until every request has its first token
        for o in eng.step():
            if o.new_token_ids:
                started.add(o.request_id)
    prefill_s = time.perf_counter() - t0
    for _ in range(a.warm_steps):
        eng.step()

    timer = PhaseTimer()
    timer.wrap(eng.scheduler, "schedule", "schedule")
    timer.wrap(eng.runner, "execute", "forward: inputs + launch")
    timer.wrap(eng, "_sample_async", "sampling: launch")
    timer.wrap(eng, "_resolve_pending", "append the step before's tokens (incl. wait)")
    timer.wrap(eng, "_compression_stage", "compression: plan")
    timer.wrap(eng.compactions, "launch_deferred", "compression: launch")
    timer.wrap(eng.compactions, "land", "compression: land")
    waited = [0.0]
    real_sync = torch.cuda.Event.synchronize

    def sync(ev):
        t = time.perf_counter()
        real_sync(ev)
        if timer.on:
            waited[0] += time.perf_counter() - t

    torch.cuda.Event.synchronize = sync
    comp0 = eng.stats().get("compressions", 0)
    torch.cuda.synchronize()
    walls = []
    timer.on = True
    for _ in range(a.steps):
        t = time.perf_counter()
        eng.step()
        walls.append(time.perf_counter() - t)
    timer.on = False
    torch.cuda.Event.synchronize = real_sync
    compressions = eng.stats().get("compressions", 0) - comp0
    running = len(eng.scheduler.running)
    kv_tokens = sum(s.kv_len for s in eng.scheduler.running)

    from torch.profiler import ProfilerActivity, profile

    n_prof = min(10, a.steps)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n_prof):
            eng.step()
        torch.cuda.synchronize()
        profiled_ms = 1e3 * (time.perf_counter() - t) / n_prof
    kinds, streams, count = kernel_times(prof, n_prof, _kind)
    if a.trace:
        prof.export_chrome_trace(os.path.join(a.out, f"engine_step_trace_{system}{a.tag}.json"))

    weight_bytes = sum(p.numel() * p.element_size() for n, p in eng.runner.model.named_parameters()
                       if "embed_tokens" not in n)
    kv_bytes = kv_tokens * eng.runner.bytes_per_block / bs
    step_ms = 1e3 * statistics.median(walls)
    res = {
        "system": system, "batch": a.batch, "running": running, "mean_context": kv_tokens / max(1, running),
        "vocab": vocab, "prefill_s": prefill_s, "steps": a.steps,
        "step_ms_median": step_ms, "step_ms_mean": 1e3 * statistics.mean(walls),
        "tokens_per_s": running / step_ms * 1e3,
        "host_ms_per_step": {k: 1e3 * v / a.steps for k, v in sorted(timer.seconds.items())},
        "host_waiting_for_gpu_ms_per_step": 1e3 * waited[0] / a.steps,
        "compressions_per_step": compressions / a.steps,
        "graph_compressions": eng.stats().get("graph_compressions", 0),
        "gpu_kernel_ms_per_step_by_kind": kinds,
        "gpu_kernel_ms_per_step_by_stream": streams,
        "gpu_kernel_ms_per_step": sum(kinds.values()), "kernels_per_step": count / n_prof,
        "gpu_busy_ms_per_step": gpu_busy_ms(prof.events()) / n_prof, "profiled_step_ms": profiled_ms,
        "top_kernels_ms_per_step": top_kernels(prof, n_prof),
        "bandwidth_floor_ms": (weight_bytes + kv_bytes) / bandwidth * 1e3,
    }
    # The forward alone, from its graph, at this batch and the mean context (overwrites the cache: last).
    res["forward_replay_ms"] = time_decode(eng.runner, min(a.batch, running), int(res["mean_context"]))
    del llm, eng
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-8b", choices=sorted(SHAPES))
    ap.add_argument("--tokenizer-from", default=None, help="a model folder: its tokenizer and vocabulary")
    ap.add_argument("--systems", default="full,compressed")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--spread", type=int, default=256, help="start contexts spread over this many tokens")
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warm-steps", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-p-by", default="rejection", choices=("rejection", "kernel", "sort"),
                    help="kernel / sort: the nucleus masked by its threshold (the radix kernel or the sort-based "
                         "reference, kernels/sampling.py) and drawn by inverse CDF, for an A/B")
    ap.add_argument("--compression", default="graphs", choices=("graphs", "eager"),
                    help="eager: compressions launched kernel by kernel instead of replayed graphs, for an A/B")
    ap.add_argument("--trace", action="store_true", help="also write the profiled steps' chrome trace to --out")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    path = config_folder(a.shape, tokenizer_from=a.tokenizer_from)
    bw = copy_bandwidth(torch.device("cuda"))
    rows = []
    for system in a.systems.split(","):
        r = run_system(system, a, path, bw)
        rows.append(r)
        print(f"{system}: {r['running']} running at mean context {r['mean_context']:.0f}: step {r['step_ms_median']:.2f} ms "
              f"(forward replay {r['forward_replay_ms']:.2f}, GPU kernels {r['gpu_kernel_ms_per_step']:.2f}, "
              f"busy {r['gpu_busy_ms_per_step']:.2f}, floor {r['bandwidth_floor_ms']:.2f}), host waited {r['host_waiting_for_gpu_ms_per_step']:.2f} ms, "
              f"{r['compressions_per_step']:.2f} compressions per step",
              flush=True)
        print("   host ms/step: " + ", ".join(f"{k} {v:.2f}" for k, v in r["host_ms_per_step"].items()), flush=True)
        print("   GPU ms/step: " + ", ".join(f"{k} {v:.2f}" for k, v in r["gpu_kernel_ms_per_step_by_kind"].items())
              + f"; by stream {r['gpu_kernel_ms_per_step_by_stream']}", flush=True)
    card = torch.cuda.get_device_name(0)
    res = {"benchmark": "engine_step", "device": card, "shape": a.shape, "copy_bandwidth_GBps": bw / 1e9,
           "tokenizer_from": a.tokenizer_from, "args": vars(a), "rows": rows}
    os.makedirs(a.out, exist_ok=True)
    write_result(os.path.join(a.out, f"engine_step_{a.shape}_{card_tag(card)}{a.tag}.json"), res, indent=1)
    return res


if __name__ == "__main__":
    main()
