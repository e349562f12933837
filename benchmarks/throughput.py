"""Long-reasoning throughput on one GPU: zipserve compressed vs zipserve full KV vs transformers' continuous
batching, same model (random bf16 weights, identical across systems), same workload, same KV pool.

Workload: N requests, prompts of 100-500 tokens (half share a 200-token system prompt), each generating
exactly L tokens (ignore_eos). The pool is N x (budget + 1) pages, so the compressed engine runs all N at
once while full KV holds only about pool / (prompt + L) requests near the end of their lives.

The ceiling: when both engines are bound by memory bandwidth and full KV packs its pool perfectly,
compressed / full tokens/s is about L / (2 b), b = budget x page + page / 2 (the mean tokens a compressed
request keeps). Each system's bandwidth floor is the bytes its steps must read (weights once per step plus
every running request's K/V) over the card's measured copy bandwidth.

    python -m benchmarks.throughput --shape qwen3-0.6b --lengths 8192,16384 --requests 32
    zipserve bench throughput ...   (the same)

transformers' engine is far slower; it runs the same requests for at most --hf-seconds and its tokens/s is
measured over that window (it is said in the output when it did not finish).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import time

import torch

from benchmarks.decode_step import SHAPES, card_tag, config_folder, copy_bandwidth
from benchmarks.provenance import write_result

log = logging.getLogger("benchmarks.throughput")


def workload(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """N prompts of 100-500 tokens; even-numbered ones start with one shared 200-token system prompt."""
    rng = random.Random(seed)
    lo = min(1000, vocab // 4)  # clear of special tokens
    system = [rng.randrange(lo, vocab - lo) for _ in range(200)]
    prompts = []
    for i in range(n):
        if i % 2 == 0:
            prompts.append(system + [rng.randrange(lo, vocab - lo) for _ in range(rng.randint(100, 300))])
        else:
            prompts.append([rng.randrange(lo, vocab - lo) for _ in range(rng.randint(100, 500))])
    return prompts


def _percentiles(xs: list[float]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)
    return {f"p{p}": xs[min(len(xs) - 1, int(p / 100 * len(xs)))] for p in (50, 90, 99)} | {"mean": sum(xs) / len(xs)}


def run_zipserve(system: str, path: str, prompts, L: int, *, budget: int, pool_pages: int, block_size: int,
                 bandwidth: float, max_seconds: float) -> dict:
    """One engine run; the timeline samples (time, running, tokens) every step. system: "compressed" or
    "full", with "-sync" for the engine without async scheduling (the host work between steps exposed)."""
    from zipserve.workers import LLM, SamplingParams
    from zipserve.workers.gpu_clock import GpuClock

    compressed = system.startswith("compressed")
    overlap = not system.endswith("-sync")
    max_len = max(map(len, prompts)) + L + block_size
    llm = LLM(path, load_format="dummy", block_size=block_size, num_blocks=pool_pages, max_num_seqs=len(prompts),
              max_model_len=max_len, budget_blocks=budget if compressed else None, async_scheduling=overlap)
    eng = llm.engine
    # Warm up (Triton compiles, graph pools), including a compression at prefill end and one in decode.
    warm_prompt = [7] * ((budget + 1) * block_size + 17 if compressed else 300)
    llm.generate([warm_prompt, prompts[0]], SamplingParams(temperature=0, max_tokens=block_size + 32, ignore_eos=True),
                 use_tqdm=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    weight_bytes = sum(p.numel() * p.element_size() for n, p in eng.runner.model.named_parameters()
                       if "embed_tokens" not in n)
    kv_token_bytes = eng.runner.bytes_per_block / block_size
    eng.runner.clock = clock = GpuClock()
    params = SamplingParams(temperature=0, max_tokens=L, ignore_eos=True)
    gen0, steps0 = eng.num_generated_tokens, eng.num_steps
    comp0 = eng.stats().get("compressions", 0)
    preempt0 = eng.scheduler.num_preemptions
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    first, last, gaps, timeline = {}, {}, [], []
    floor_s = 0.0
    incomplete = False
    while eng.has_unfinished_requests():
        running = eng.scheduler.running
        kv = sum(s.kv_len for s in running)
        floor_s += (weight_bytes + kv * kv_token_bytes) / bandwidth
        outs = eng.step()
        t = time.perf_counter() - t0
        n_tok = 0
        for o in outs:
            n_tok += len(o.new_token_ids)
            rid = o.request_id
            if rid not in first:
                first[rid] = t
            else:
                gaps.append(t - last[rid])
            last[rid] = t
        timeline.append((t, len(running), n_tok))
        if t > max_seconds:
            incomplete = True
            for rid in list(eng.requests):
                eng.abort_request(rid)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tokens = eng.num_generated_tokens - gen0
    gpu = clock.totals_ms()
    stats = eng.stats()
    running = [r for _, r, _ in timeline]
    result = {
        "system": f"zipserve {system}", "async_scheduling": overlap, "requests": len(prompts), "output_len": L, "complete": not incomplete,
        "output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "steps": eng.num_steps - steps0,
        "mean_running": sum(running) / len(running), "peak_running": max(running),
        "ttft_s": _percentiles(list(first.values())), "itl_ms": {k: 1e3 * v for k, v in _percentiles(gaps).items()},
        "gpu_forward_s": gpu.get("forward", 0.0) / 1e3, "gpu_compression_s": gpu.get("compression", 0.0) / 1e3,
        "compression_share_of_gpu_time": gpu.get("compression", 0.0) / max(1e-9, sum(gpu.values())),
        "compressions": stats.get("compressions", 0) - comp0, "preemptions": eng.scheduler.num_preemptions - preempt0,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "bandwidth_floor_s": floor_s, "floor_fraction": floor_s / wall,
        "timeline": _thin(timeline),
    }
    del llm, eng
    gc.collect()
    torch.cuda.empty_cache()
    return result


def _thin(timeline, points: int = 400):
    """About `points` samples of (t, running, tokens/s over the interval)."""
    if not timeline:
        return []
    stride = max(1, len(timeline) // points)
    out, prev_t, acc = [], 0.0, 0
    for i, (t, r, n) in enumerate(timeline):
        acc += n
        if (i + 1) % stride == 0 or i == len(timeline) - 1:
            out.append((round(t, 3), r, acc / max(1e-9, t - prev_t)))
            prev_t, acc = t, 0
    return out


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
        "ttft_s": _percentiles(list(first.values())), "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "timeline": _thin(timeline),
    }
    del model, manager
    gc.collect()
    torch.cuda.empty_cache()
    return result


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--lengths", default="8192,16384", help="output lengths L, comma-separated")
    ap.add_argument("--requests", type=int, default=32, help="N: the compressed engine's slot count")
    ap.add_argument("--budget", type=int, default=8, help="compressed budget in pages")
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--systems", default="compressed,full,transformers",
                    help="of compressed, full, transformers, compressed-sync, full-sync (no async scheduling)")
    ap.add_argument("--tag", default="", help="suffix of the result files' names")
    ap.add_argument("--max-seconds", type=float, default=300, help="abort a zipserve run after this long")
    ap.add_argument("--hf-seconds", type=float, default=90, help="transformers' measurement window")
    ap.add_argument("--out", default="benchmarks/results")


def run(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        raise RuntimeError("the throughput benchmark needs a CUDA GPU")
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    path = config_folder(args.shape)
    prompts = workload(args.requests, SHAPES[args.shape]["vocab_size"])
    pool = args.requests * (args.budget + 1)
    b = args.budget * args.block_size + args.block_size / 2
    card = torch.cuda.get_device_name(dev)
    results = {"benchmark": "throughput", "device": card, "shape": args.shape, "requests": args.requests,
               "budget_blocks": args.budget, "block_size": args.block_size, "pool_pages": pool,
               "copy_bandwidth_GBps": bw / 1e9, "prompt_tokens": sum(map(len, prompts)), "lengths": []}
    for L in [int(x) for x in args.lengths.split(",")]:
        row = {"output_len": L, "ceiling_compressed_over_full": L / (2 * b),
               "full_kv_concurrency_at_end": pool * args.block_size / (sum(map(len, prompts)) / len(prompts) + L),
               "systems": {}}
        for system in args.systems.split(","):
            log.info("L=%d: running %s", L, system)
            if system in ("compressed", "full", "compressed-sync", "full-sync"):
                r = run_zipserve(system, path, prompts, L, budget=args.budget, pool_pages=pool,
                                 block_size=args.block_size, bandwidth=bw, max_seconds=args.max_seconds)
            elif system == "transformers":
                r = run_transformers(path, prompts, L, pool_pages=pool, block_size=args.block_size,
                                     max_seconds=args.hf_seconds)
            else:
                raise ValueError(f"unknown system {system!r}")
            row["systems"][system] = r
            print(f"L={L:6d} {r['system']:>20}: {r['tokens_per_s']:9.0f} tok/s  {r['output_tokens']:8d} tokens in "
                  f"{r['wall_s']:6.1f} s  mean/peak running {r.get('mean_running', 0):5.1f}/{r.get('peak_running', 0):3d}"
                  f"  {'' if r['complete'] else 'INCOMPLETE'}"
                  + (f"  floor {100 * r['floor_fraction']:.0f}%  compression {100 * r['compression_share_of_gpu_time']:.1f}%"
                     f" of GPU time" if "floor_fraction" in r else ""), flush=True)
        s = row["systems"]
        if "compressed" in s and "full" in s:
            row["compressed_over_full"] = s["compressed"]["tokens_per_s"] / s["full"]["tokens_per_s"]
            row["fraction_of_ceiling"] = row["compressed_over_full"] / row["ceiling_compressed_over_full"]
            print(f"L={L}: compressed / full KV = {row['compressed_over_full']:.2f}x "
                  f"(ceiling {row['ceiling_compressed_over_full']:.2f}x, {100 * row['fraction_of_ceiling']:.0f}% of it)")
        for name in ("compressed", "full"):
            if name in s and f"{name}-sync" in s:
                row[f"{name}_async_over_sync"] = s[name]["tokens_per_s"] / s[f"{name}-sync"]["tokens_per_s"]
                print(f"L={L}: {name}: async scheduling / synchronous = {row[f'{name}_async_over_sync']:.2f}x")
        if "compressed" in s and "transformers" in s:
            row["compressed_over_transformers"] = s["compressed"]["tokens_per_s"] / s["transformers"]["tokens_per_s"]
            print(f"L={L}: compressed / transformers CB = {row['compressed_over_transformers']:.1f}x")
        results["lengths"].append(row)
        _write(results, args.out, args.tag)
    return results


_SETUP = ("shape", "device", "requests", "budget_blocks", "block_size", "pool_pages")


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
            new_lengths = {row["output_len"] for row in results["lengths"]}
            kept = [row for row in old["lengths"] if row["output_len"] not in new_lengths]
            merged = dict(results, lengths=sorted(kept + results["lengths"], key=lambda r: r["output_len"]))
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
        for name, r in row["systems"].items():
            tl = r.get("timeline") or []
            if not tl:
                continue
            t = [p[0] for p in tl]
            axes[0][j].plot(t, [p[2] for p in tl], label=f"{r['system']} ({r['tokens_per_s']:.0f} tok/s)")
            axes[1][j].plot(t, [p[1] for p in tl], label=r["system"])
        ratio = row.get("compressed_over_full")
        axes[0][j].set(title=f"L = {row['output_len']}" + (f": {ratio:.2f}x full KV (ceiling "
                       f"{row['ceiling_compressed_over_full']:.2f}x)" if ratio else ""), ylabel="output tokens/s")
        axes[1][j].set(xlabel="seconds", ylabel="running requests")
        axes[0][j].legend(fontsize=7)
    fig.suptitle(f"{results['shape']} (random bf16), {results['requests']} requests, pool {results['pool_pages']} x "
                 f"{results['block_size']}, budget {results['budget_blocks']} pages, {results['device']}")
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
