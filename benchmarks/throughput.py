"""Long-reasoning throughput on one GPU: zipserve compressed vs zipserve full KV vs vLLM (its own process) vs
transformers' continuous batching, same model shape (random bf16 weights), same requests.

Workload (benchmarks/closed_loop.Workload): prompts of 100-500 tokens (half share a 200-token system
prompt), each generating exactly L tokens (ignore_eos), or with --mixed a long-tailed L per request.

Pools. `--pool whole` (the headline): every system sizes its KV pool from GPU memory as a user would
(gpu_memory_utilization 0.9), N requests offered at once (N large enough that compressed fills its slots).
`--pool budget`: every system gets N x (budget + 1) pages, so compressed runs all N at once while full KV
holds about pool / (prompt + L); it isolates the mechanism, and its ceiling is compressed / full tokens/s
of about L / (2 b), b = budget x page + page / 2 (the mean tokens a compressed request keeps).

Modes (--mode): `complete` runs the N requests to the end; `window` keeps N in flight (a new request as one
finishes) and counts tokens over --window seconds after --warmup, the same window for every system: for
runs that would not fit one sitting. Each system's bandwidth floor is the bytes its steps must read
(weights once per step plus the K/V of its running requests) over the card's measured copy bandwidth.

    python -m benchmarks.throughput --shape qwen3-8b --pool whole --requests 256 --lengths 8192 \
        --mode window --warmup 60 --window 120 --systems compressed,full,vllm --vllm-site /tmp/vsite
    zipserve bench throughput ...   (the same)

transformers' engine is far slower; it runs the same requests for at most --hf-seconds (budget pool only).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.closed_loop import Engine, Workload, drive, percentiles, steady_running, thin
from benchmarks.decode_step import SHAPES, card_tag, config_folder, copy_bandwidth
from benchmarks.provenance import write_result

log = logging.getLogger("benchmarks.throughput")


def prompts_of(workload: Workload, n: int) -> list[list[int]]:
    return [workload.request(i)[0] for i in range(n)]


def _model_bytes(shape: str) -> tuple[float, float]:
    """(weight bytes a decode step reads, K/V bytes per cached token) of a bf16 model of this shape."""
    s = SHAPES[shape]
    head_dim = s.get("head_dim", s["hidden_size"] // s["num_attention_heads"])
    q, kv = s["num_attention_heads"] * head_dim, s["num_key_value_heads"] * head_dim
    h = s["hidden_size"]
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * s["intermediate_size"]
    weights = 2 * (s["num_hidden_layers"] * per_layer + h * s["vocab_size"])  # + lm_head
    return weights, 2 * 2 * s["num_hidden_layers"] * kv


def run_zipserve(system: str, path: str, workload: Workload, a, *, pool_pages: int | None, bandwidth: float,
                 max_len: int) -> dict:
    """One engine, driven by benchmarks.closed_loop. system: "compressed" or "full", with "-sync" for the
    engine without async scheduling (the host work between steps exposed); "compressed-recall": compressed
    with recall of evicted entries (--recall-pages per layer and head per compression, issue 27)."""
    from zipserve.workers import LLM, SamplingParams
    from zipserve.workers.gpu_clock import GpuClock

    compressed = system.startswith("compressed")
    overlap = not system.endswith("-sync")
    bs = a.full_block_size if a.full_block_size and not compressed else a.block_size
    budget = a.budget
    extra = {"compression": {"recall": {"pages": a.recall_pages}}} if system == "compressed-recall" else {}
    llm = LLM(path, load_format="dummy", block_size=bs, num_blocks=pool_pages, max_num_seqs=a.requests,
              max_model_len=max_len, budget_blocks=budget if compressed else None, async_scheduling=overlap, **extra)
    eng = llm.engine
    if workload.aged and a.aged == "capacity":
        workload = dataclasses.replace(workload, aged=steady_running(
            workload, a.requests, eng.block_manager.num_blocks * bs, bs, budget if compressed else None))
    # Warm up (Triton compiles, graph pools), including a compression at prefill end and one in decode.
    warm_prompt = [7] * ((budget + 1) * bs + 17 if compressed else 300)
    llm.generate([warm_prompt, workload.request(0)[0]], SamplingParams(temperature=0, max_tokens=bs + 32,
                 ignore_eos=True), use_tqdm=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    weight_bytes = sum(p.numel() * p.element_size() for n, p in eng.runner.model.named_parameters()
                       if "embed_tokens" not in n)
    kv_token_bytes = eng.runner.bytes_per_block / bs
    eng.runner.clock = clock = GpuClock()
    comp0, preempt0 = eng.stats().get("compressions", 0), eng.scheduler.num_preemptions

    def step():
        return [(o.request_id, len(o.new_token_ids), o.finished) for o in eng.step()]

    def floor():
        kv = sum(s.kv_len for s in eng.scheduler.running)
        return (weight_bytes + kv * kv_token_bytes) / bandwidth

    engine = Engine(add=lambda rid, p, n: eng.add_request(rid, p, SamplingParams(temperature=0, max_tokens=n,
                                                                                  ignore_eos=True)),
                    step=step, has_work=eng.has_unfinished_requests, running=lambda: len(eng.scheduler.running),
                    step_floor_s=floor, abort=eng.abort_request, prefill_tokens=lambda: eng.num_prefill_tokens_computed)

    def after() -> dict:
        probe = workload.request(10**6)[0]  # a fresh request's prompt (not an aged one)

        def admit():  # the latest admitted request ends (aborted) and a fresh one arrives, as in the loop
            if eng.scheduler.running:
                eng.abort_request(eng.scheduler.running[-1].request_id)
            engine.add("admission-probe", probe, 64)

        found = profile_steps(step, a.profile_steps) | profile_admission(
            step, admit, lambda: eng.requests.get("admission-probe") is not None
            and eng.requests["admission-probe"].num_computed_tokens > 0)
        eng.abort_request("admission-probe")
        return found

    alloc0 = torch.cuda.memory_stats()
    with _frozen_heap():
        result = drive(engine, workload, a.requests, a.mode, warmup_of(a, system), a.window, a.max_seconds,
                       after=after if a.profile_steps else None)
    alloc1 = torch.cuda.memory_stats()
    torch.cuda.synchronize()
    gpu = clock.totals_ms()
    result |= {
        "system": f"zipserve {system}", "async_scheduling": overlap, "pool_pages": eng.block_manager.num_blocks,
        "gpu_forward_s": gpu.get("forward", 0.0) / 1e3, "gpu_compression_s": gpu.get("compression", 0.0) / 1e3,
        "compression_share_of_gpu_time": gpu.get("compression", 0.0) / max(1e-9, sum(gpu.values())),
        "compressions": eng.stats().get("compressions", 0) - comp0,
        **({"recall": {k: v for k, v in eng.stats().items() if k.startswith("recall")}}
           if system == "compressed-recall" else {}),
        "preemptions": eng.scheduler.num_preemptions - preempt0,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        # cudaMalloc / cudaFree calls and out-of-memory retries (each frees the cache: a device sync) in the run
        "allocator": {k: alloc1.get(k, 0) - alloc0.get(k, 0)
                      for k in ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")},
    }
    del llm, eng
    gc.collect()
    torch.cuda.empty_cache()
    return result


@contextlib.contextmanager
def _frozen_heap():
    """As the serving engine process does (workers/async_engine.py): what exists now (the engine, loaded and
    warm) is kept out of the collector's walks while the run lasts, then handed back to it, so that the next
    system's engine in this process can collect this one."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _profiled(step, steps: int, host: bool = False):
    """Run `steps` engine steps under the torch profiler (GPU, and host ops too if `host`); returns the
    profile, the wall seconds and its GPU kernels (and copies)."""
    acts = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if host else [])
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    return prof, wall, [ev for ev in prof.events() if ev.device_type.name == "CUDA" and ev.device_time > 0]


def profile_steps(step, steps: int) -> dict:
    """Kernel time of `steps` engine steps in the steady state the window measured (torch profiler), split
    by stream: the stream with the most kernel time runs the forward, the others the compression (its own
    stream). Two shares: compression kernels of all kernel time, and the time only compression kept the
    GPU busy (the union of all kernel intervals minus the forward stream's) of all busy time."""
    from benchmarks.engine_step import gpu_busy_ms, gpu_gaps, overlap_slowdown_ms

    _, wall, kernels = _profiled(step, steps)
    if not kernels:
        return {"profile_error": "the profiler recorded no GPU kernels (CUPTI unavailable?)"}
    by_stream: dict[int, float] = {}
    for ev in kernels:
        by_stream[ev.device_resource_id] = by_stream.get(ev.device_resource_id, 0.0) + ev.device_time / 1e3
    main = max(by_stream, key=by_stream.get)
    names: dict[str, float] = {}
    for ev in (ev for ev in kernels if ev.device_resource_id != main):
        names[ev.name[:80]] = names.get(ev.name[:80], 0.0) + ev.device_time / 1e3 / steps
    busy, busy_main = gpu_busy_ms(kernels), gpu_busy_ms([ev for ev in kernels if ev.device_resource_id == main])
    total, side_ms = sum(by_stream.values()), sum(v for k, v in by_stream.items() if k != main)
    slowdown, unmatched = overlap_slowdown_ms(
        [(ev.name, ev.time_range.start, ev.time_range.end) for ev in kernels if ev.device_resource_id == main],
        [(ev.time_range.start, ev.time_range.end) for ev in kernels if ev.device_resource_id != main])
    cost = busy - busy_main + slowdown  # what compression added to the GPU's busy time
    gaps = gpu_gaps([(ev.name, ev.time_range.start, ev.time_range.end) for ev in kernels])
    per_step = {k: v / steps for k, v in gaps.items() if k != "long_gaps_between"}
    return {"profile": {
        "steps": steps, "wall_ms_per_step": 1e3 * wall / steps, "kernel_ms_per_step": total / steps,
        "forward_stream_kernel_ms_per_step": by_stream[main] / steps, "other_streams_kernel_ms_per_step": side_ms / steps,
        "busy_ms_per_step": busy / steps, "busy_only_other_streams_ms_per_step": (busy - busy_main) / steps,
        "compression_share_of_kernel_time": side_ms / total if total else 0.0,
        "compression_only_share_of_busy_time": (busy - busy_main) / busy if busy else 0.0,
        "forward_slowdown_beside_compression_ms_per_step": slowdown / steps,
        "forward_kernels_overlapped_without_a_clean_run": unmatched,
        # the busy time compression ran alone, plus what the forward's kernels lost running beside it
        "compression_cost_share_of_busy_time": cost / busy if busy else 0.0,
        "other_stream_kernels_ms_per_step": dict(sorted(names.items(), key=lambda x: -x[1])[:15]),
        "kernels_per_step": len(kernels) / steps,
        "idle_per_step": per_step, "long_idle_between": gaps["long_gaps_between"],
        "note": "profiled steps run after the window, with the profiler's overhead; not part of its figures"}}


def profile_admission(step, admit, admitted, steps: int = 4) -> dict:
    """Where an admission's extra time goes (a step with a prefill chunk runs eagerly, not from a decode
    graph): `steps` decode steps, then a request added (`admit`: room is made for it, as a request ending
    makes room) and `steps` more, each run profiled (host and GPU): wall, GPU busy and kernel time, the
    kernels of most time and the host ops of most self time. `admitted()`: whether its prefill ran."""
    from benchmarks.engine_step import gpu_busy_ms, top_kernels

    def run() -> dict:
        prof, wall, kernels = _profiled(step, steps, host=True)
        host = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
        return {"wall_ms": 1e3 * wall, "busy_ms": gpu_busy_ms(kernels),
                "kernel_ms": sum(ev.device_time for ev in kernels) / 1e3,
                "top_kernels_ms_per_step": top_kernels(prof, steps, 12),
                "host_self_ms": {e.key[:80]: [e.self_cpu_time_total / 1e3, e.count] for e in host}}

    decode = run()
    admit()
    with_admission = run()
    return {"admission_profile": {"steps": steps, "decode": decode, "with_admission": with_admission,
                                  "admitted": admitted(),
                                  "note": "profiler overhead included in both runs; compare them, not absolute times"}}


def run_vllm(path: str, workload: Workload, a, *, bandwidth: float, max_len: int) -> dict:
    """vLLM 0.26 offline in its own process (benchmarks/vllm_engine.py), whole GPU, the same driver."""
    if not a.vllm_site:
        raise ValueError("--systems vllm needs --vllm-site (vLLM's unpacked site packages)")
    if a.pool != "whole":
        raise ValueError("vLLM sizes its pool from GPU memory: run it with --pool whole")
    weights, kv_bytes = _model_bytes(a.shape)
    spec = {"model": path, "gpu_memory_utilization": 0.9, "max_num_seqs": a.requests, "max_model_len": max_len,
            "workload": workload.describe() | {"vocab": workload.vocab}, "concurrency": a.requests, "mode": a.mode,
            "age_to_capacity": a.aged == "capacity", "warmup_s": warmup_of(a, "vllm"), "window_s": a.window, "max_seconds": a.max_seconds, "bandwidth": bandwidth,
            "weight_bytes": weights, "kv_bytes_per_token": kv_bytes}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=f"{a.vllm_site}:{root}", VLLM_USE_FLASHINFER_SAMPLER="0",
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TVM_FFI_DISABLE_TORCH_C_DLPACK="1")
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        subprocess.run([sys.executable, "-m", "benchmarks.vllm_engine", spec_path, out_path], env=env, check=True,
                       timeout=a.max_seconds + 900)
        with open(out_path) as f:
            return json.load(f)


def hf_model(path: str, device: str = "cuda", dtype=torch.bfloat16):
    """transformers' Qwen3 with the same random weights as zipserve's dummy loader (same seed and order)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from zipserve.workers.models.loader import load_model

    ours = load_model(path, torch.device(device), dtype, 128, "dummy", 0, "torch")
    cfg = AutoConfig.from_pretrained(path)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="paged|sdpa")
    a = ours.args
    state = {}
    for name, p in ours.state_dict().items():
        hf = "model." + name if not name.startswith("lm_head") else name
        if "qkv_proj" in name:
            for part, t in zip(("q_proj", "k_proj", "v_proj"),
                               p.split([a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim])):
                state[hf.replace("qkv_proj", part)] = t
        elif "gate_up_proj" in name:
            for part, t in zip(("gate_proj", "up_proj"), p.split(a.intermediate_size)):
                state[hf.replace("gate_up_proj", part)] = t
        else:
            state[hf] = p
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping to transformers failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    del ours
    return model.eval()


def run_transformers(path: str, prompts, L: int, *, pool_pages: int, block_size: int, max_seconds: float) -> dict:
    """transformers' continuous batching (paged attention, same pool), streamed so that tokens are counted
    as they come; stopped after max_seconds."""
    import transformers
    from transformers import GenerationConfig
    from transformers.generation import configuration_utils as cu

    model = hf_model(path)
    gen_cfg = GenerationConfig(max_new_tokens=L, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generation_config.eos_token_id = None
    try:
        cb_cfg = cu.ContinuousBatchingConfig(page_size=block_size, num_blocks=pool_pages)
    except TypeError:  # transformers < 5.17 named the page size block_size
        cb_cfg = cu.ContinuousBatchingConfig(block_size=block_size, num_blocks=pool_pages)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    manager = model.init_continuous_batching(generation_config=gen_cfg, continuous_batching_config=cb_cfg)
    manager.start()
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        manager.add_request(p, request_id=f"r{i}", max_new_tokens=L, streaming=True)
    counts, first, finished = {}, {}, set()
    timeline, prev = [], 0
    while len(finished) < len(prompts) and time.perf_counter() - t0 < max_seconds:
        out = manager.get_result(timeout=0.5)
        if out is None:
            continue
        if out.error:
            raise RuntimeError(f"transformers request {out.request_id} failed: {out.error}")
        t = time.perf_counter() - t0
        counts[out.request_id] = len(out.generated_tokens)
        first.setdefault(out.request_id, t)
        if out.is_finished():
            finished.add(out.request_id)
        total = sum(counts.values())
        if total - prev >= 64 or len(finished) == len(prompts):
            timeline.append((t, len(counts) - len(finished), total - prev))
            prev = total
    wall = time.perf_counter() - t0
    manager.stop(block=True, timeout=30)
    tokens = sum(counts.values())
    result = {
        "system": "transformers CB", "transformers_version": transformers.__version__, "requests": len(prompts),
        "output_len": L, "complete": len(finished) == len(prompts), "finished_requests": len(finished),
        "output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
        "ttft_s": percentiles(list(first.values())), "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "timeline": thin(timeline),
    }
    del model, manager
    gc.collect()
    torch.cuda.empty_cache()
    return result


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--lengths", default="8192,16384", help="output lengths L, comma-separated (with --mixed: "
                    "the median of the long-tailed lengths)")
    ap.add_argument("--mixed", action="store_true", help="a long-tailed output length per request (2k-32k)")
    ap.add_argument("--requests", type=int, default=32, help="N: requests offered at once (the slot count)")
    ap.add_argument("--pool", default="budget", choices=("whole", "budget"),
                    help="whole: each system sizes its pool from GPU memory; budget: N x (budget + 1) pages")
    ap.add_argument("--mode", default="complete", choices=("complete", "window"))
    ap.add_argument("--warmup", type=float, default=60.0, help="window mode: seconds before the window (the N "
                    "first requests start part-way through their lives, so the loop starts in its steady state)")
    ap.add_argument("--warmup-for", action="append", default=[], metavar="SYSTEM=SECONDS",
                    help="window mode: this system's own warm-up (one whose window would still hold the prefills of "
                         "the aged prompts, e.g. compressed at 32k; its timeline shows when it is steady)")
    ap.add_argument("--window", type=float, default=120.0, help="window mode: seconds counted")
    ap.add_argument("--aged", default="capacity", choices=("capacity", "offered"),
                    help="window mode: how many requests start part-way through their lives: as many as each system "
                         "runs at once in the steady state (capacity; the others wait fresh, as waiting requests do), "
                         "or all N offered (each system then prefills histories for requests that only waited)")
    ap.add_argument("--budget", type=int, default=8, help="compressed budget in pages")
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--full-block-size", type=int, help="--pool whole: full KV's page size, if not --block-size "
                    "(full KV has no use for compression's large pages; a smaller one wastes less of the pool)")
    ap.add_argument("--systems", default="compressed,full,transformers",
                    help="of compressed, full, vllm, transformers, compressed-sync, full-sync (no async scheduling), "
                    "compressed-recall")
    ap.add_argument("--recall-pages", type=int, default=4, help="compressed-recall: pages recalled per compression")
    ap.add_argument("--vllm-site", help="vLLM's unpacked site packages (for --systems vllm)")
    ap.add_argument("--tag", default="", help="suffix of the result files' names")
    ap.add_argument("--max-seconds", type=float, default=300, help="stop a run after this long")
    ap.add_argument("--hf-seconds", type=float, default=90, help="transformers' measurement window")
    ap.add_argument("--profile-steps", type=int, default=0, help="zipserve: after the window, profile this many "
                    "steps of the same steady state (kernel time by stream: forward vs compression)")
    ap.add_argument("--out", default="benchmarks/results")


def run(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.full_block_size and args.pool != "whole":
        raise ValueError("--full-block-size needs --pool whole (a budget pool is counted in --block-size pages)")
    if not torch.cuda.is_available():
        raise RuntimeError("the throughput benchmark needs a CUDA GPU")
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    path = config_folder(args.shape)
    vocab = SHAPES[args.shape]["vocab_size"]
    pool = args.requests * (args.budget + 1) if args.pool == "budget" else None
    b = args.budget * args.block_size + args.block_size / 2
    card = torch.cuda.get_device_name(dev)
    results = {"benchmark": "throughput", "device": card, "shape": args.shape, "requests": args.requests,
               "budget_blocks": args.budget, "block_size": args.block_size,
               "full_block_size": args.full_block_size or args.block_size, "pool": args.pool, "pool_pages": pool,
               "mode": args.mode, "copy_bandwidth_GBps": bw / 1e9, "lengths": []}
    for L in [int(x) for x in args.lengths.split(",")]:
        workload = Workload(vocab, L, mixed=args.mixed, aged=args.requests if args.mode == "window" else 0)
        prompts = prompts_of(workload, args.requests)
        max_len = 500 + (workload.max_len if args.mixed else L) + args.block_size  # an aged prompt + rest <= L
        row = {"output_len": L, "mixed": args.mixed, "prompt_tokens": sum(map(len, prompts)), "systems": {}}
        results["lengths"].append(row)
        if pool is not None and not args.mixed:
            row |= {"ceiling_compressed_over_full": L / (2 * b),
                    "full_kv_concurrency_at_end": pool * args.block_size / (row["prompt_tokens"] / len(prompts) + L)}
        for system in _vllm_first(args.systems.split(",")):
            log.info("L=%d%s: running %s", L, " (mixed)" if args.mixed else "", system)
            if system in ("compressed", "full", "compressed-sync", "full-sync", "compressed-recall"):
                r = run_zipserve(system, path, workload, args, pool_pages=pool, bandwidth=bw, max_len=max_len)
            elif system == "vllm":
                r = run_vllm(path, workload, args, bandwidth=bw, max_len=max_len)
            elif system == "transformers":
                if pool is None or args.mixed:
                    raise ValueError("transformers runs with --pool budget and a fixed L only")
                r = run_transformers(path, prompts, L, pool_pages=pool, block_size=args.block_size,
                                     max_seconds=args.hf_seconds)
            else:
                raise ValueError(f"unknown system {system!r}")
            row["systems"][system] = r
            print(f"L={L:6d} {r['system']:>20}: {r['tokens_per_s']:9.0f} tok/s  {r['output_tokens']:8d} tokens in "
                  f"{r.get('span_s', r.get('wall_s', 0)):6.1f} s  mean/peak running {r.get('mean_running', 0):5.1f}/"
                  f"{r.get('peak_running', 0):3d}  {'' if r['complete'] else 'INCOMPLETE'}"
                  + (f"  floor {100 * r['floor_fraction']:.0f}%" if "floor_fraction" in r else "")
                  + (f"  compression {100 * r['compression_share_of_gpu_time']:.1f}% of GPU time"
                     if "compression_share_of_gpu_time" in r else "")
                  + (f"  profiled: compression {100 * r['profile']['compression_share_of_kernel_time']:.1f}% of kernel "
                     f"time, alone {100 * r['profile']['compression_only_share_of_busy_time']:.1f}% of busy time"
                     if "profile" in r else ""), flush=True)
            _ratios(row)
            _write(results, args.out, args.tag)  # after every system: a later one may not fit the call
    return results


def warmup_of(a, system: str) -> float:
    """This system's warm-up in seconds: its --warmup-for, else --warmup."""
    for item in a.warmup_for:
        name, sep, seconds = item.partition("=")
        if not sep:
            raise ValueError(f"--warmup-for takes SYSTEM=SECONDS, got {item!r}")
        if name == system:
            return float(seconds)
    return a.warmup


def _vllm_first(systems: list[str]) -> list[str]:
    """vLLM sizes its pool from the GPU memory free when it starts, and an engine run before it in this
    process does not hand all of its memory back (vLLM then refuses to start): so vLLM runs first."""
    if "vllm" in systems and systems[0] != "vllm":
        log.info("running vllm first (it sizes its pool from the GPU memory free at its start)")
        systems = ["vllm"] + [s for s in systems if s != "vllm"]
    return systems


def _ratios(row: dict) -> None:
    """Every system's tokens/s over every other's that the row holds (compressed / vllm, ...)."""
    s = row["systems"]
    for x in ("compressed", "full", "compressed-sync", "full-sync"):
        for y in ("full", "vllm", "transformers", "compressed-sync", "full-sync", "compressed-recall"):
            if x != y and x in s and y in s and (x, y) != ("full", "compressed-sync"):
                row[f"{x}_over_{y}"] = s[x]["tokens_per_s"] / max(1e-9, s[y]["tokens_per_s"])
    if "compressed_over_full" in row and "ceiling_compressed_over_full" in row:
        row["fraction_of_ceiling"] = row["compressed_over_full"] / row["ceiling_compressed_over_full"]


_SETUP = ("shape", "device", "requests", "budget_blocks", "block_size", "pool", "pool_pages", "mode")


def _write(results: dict, out: str, tag: str = "") -> None:
    """Write the results; lengths measured earlier with the same setup (shape, card, N, budget, pool) in the
    same file are kept, so that lengths run in separate calls end up in one table."""
    os.makedirs(out, exist_ok=True)
    name = os.path.join(out, f"throughput_{results['shape']}_{card_tag(results['device'])}{tag}")
    merged = results
    if os.path.isfile(name + ".json"):
        with open(name + ".json") as f:
            old = json.load(f)
        if all(old.get(k) == results.get(k) for k in _SETUP):
            key = lambda row: (row.get("mixed", False), row["output_len"])  # noqa: E731
            new = {key(row) for row in results["lengths"]}
            kept = [row for row in old["lengths"] if key(row) not in new]
            merged = dict(results, lengths=sorted(kept + results["lengths"], key=key))
    write_result(name + ".json", merged, indent=1)
    plot(merged, name + ".png")


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the GPU image may lack matplotlib: redraw later with --plot
        return
    rows = results["lengths"]
    fig, axes = plt.subplots(2, len(rows), figsize=(5 * len(rows), 7), squeeze=False)
    for j, row in enumerate(rows):
        top = 0.0
        for name, r in row["systems"].items():
            tl = r.get("timeline") or []
            if not tl:
                continue
            rates = sorted(p[2] for p in tl)
            top = max(top, 1.3 * rates[int(0.98 * (len(rates) - 1))])  # a bucket of near-zero time is a spike
            t = [p[0] for p in tl]
            axes[0][j].plot(t, [p[2] for p in tl], label=f"{r['system']} ({r['tokens_per_s']:.0f} tok/s)")
            axes[1][j].plot(t, [p[1] for p in tl], label=r["system"])
        title = f"L ~ {row['output_len']} (mixed)" if row.get("mixed") else f"L = {row['output_len']}"
        ratios = [f"{row[k]:.2f}x {k.split('_over_')[1]}" for k in ("compressed_over_vllm", "compressed_over_full")
                  if k in row]
        axes[0][j].set(title=title + (": compressed " + ", ".join(ratios) if ratios else ""), ylabel="output tokens/s")
        if top > 0:
            axes[0][j].set_ylim(0, top)
        axes[1][j].set(xlabel="seconds", ylabel="running requests")
        axes[0][j].legend(fontsize=7)
    pool = "whole GPU" if results.get("pool") == "whole" else f"pool {results['pool_pages']} x {results['block_size']}"
    mode = results.get("mode", "complete")
    fig.suptitle(f"{results['shape']} (random bf16), {results['requests']} requests ({mode}), {pool}, "
                 f"budget {results['budget_blocks']} x {results['block_size']}, {results['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("--plot", help="only redraw the PNG of this result JSON")
    args = ap.parse_args(argv)
    if args.plot:
        with open(args.plot) as f:
            plot(json.load(f), args.plot.removesuffix(".json") + ".png")
        return None
    return run(args)


if __name__ == "__main__":
    main()
