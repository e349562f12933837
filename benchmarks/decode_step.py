"""Decode step time on a real model shape (random weights on the device) against the bandwidth floor.

For each batch size B, B requests each hold a `--context`-token cache (random K/V in pages); one decode
step runs one token per request through the whole model. The floor is the bytes a step must read
(weights + the batch's K/V) over the card's measured copy bandwidth. Both backends run in the same
process on the same weights, cache and tables. Needs CUDA.

    python -m benchmarks.decode_step [--shape qwen3-8b] [--batches 64,128,256] [--context 2048] \
        [--backends triton,triton-unfused,torch] [--profile 128]

Backends: `triton` (fused elementwise kernels), `triton-unfused` (Triton attention, torch norm/RoPE/act),
`torch` (references). `--profile B` records one batch-B step per backend with the torch profiler and
splits GPU kernel time by kind (GEMM, attention, norm, RoPE, activation, KV store, other).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import torch
from benchmarks.provenance import write_result

SHAPES = {  # config.json fields of real models (weights are made on the device)
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936),
}


def config_folder(shape: str, max_pos: int = 40960, tokenizer_from: str | None = None) -> str:
    """A config-only Qwen3 model folder (use with load_format='dummy'). With `tokenizer_from` (a model folder)
    its tokenizer files are copied in and the vocabulary and EOS follow that model's, so that text and chat
    requests work against the random-weight model."""
    path = tempfile.mkdtemp(prefix=f"{shape}-")
    cfg = dict(SHAPES[shape], architectures=["Qwen3ForCausalLM"], model_type="qwen3", rms_norm_eps=1e-6,
               max_position_embeddings=max_pos, rope_theta=1000000.0, tie_word_embeddings=False,
               hidden_act="silu", eos_token_id=151645)
    if tokenizer_from:
        with open(os.path.join(tokenizer_from, "config.json")) as f:
            donor = json.load(f)
        cfg.update(vocab_size=donor["vocab_size"], eos_token_id=donor["eos_token_id"])
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                     "generation_config.json"):
            if os.path.isfile(os.path.join(tokenizer_from, name)):
                shutil.copy(os.path.join(tokenizer_from, name), path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def card_tag(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100' (result files are named by card)."""
    words = [w.lower() for w in device_name.split() if any(c.isdigit() for c in w)]
    return words[0] if words else device_name.lower().replace(" ", "-")


def copy_bandwidth(device) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device).random_()
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    n = 20
    for _ in range(n):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * n / (start.elapsed_time(end) / 1e3)


def time_decode(runner, batch: int, context: int, iters: int = 20) -> float:
    """Median milliseconds of one decode step of `batch` requests with `context` cached tokens each."""
    from zipserve.workers.sampling_params import SamplingParams
    from zipserve.workers.scheduler import ScheduledChunk
    from zipserve.workers.sequence import Sequence

    bs = runner.block_size
    pages = -(-(context + 1) // bs)
    chunks = []
    for b in range(batch):
        seq = Sequence(f"b{b}", [1] * (context + 1), context, SamplingParams(), b)
        seq.num_computed_tokens = context
        seq.block_table = list(range(b * pages, (b + 1) * pages))
        chunks.append(ScheduledChunk(seq, 1))
    for _ in range(3):
        runner.execute(chunks)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        runner.execute(chunks)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


KERNEL_KINDS = (  # (kind, substrings of the kernel name), first match wins
    ("attention", ("_attn", "paged", "_reduce_kernel", "_decode")),
    ("kv_store", ("_store_kv", "_store_q_window", "index_put", "scatter")),
    ("rms_norm", ("_rms_norm", "rsqrt", "pow", "mean", "reduce")),
    ("rope", ("_qk_norm_rope", "cat", "index", "gather")),
    ("activation", ("_silu", "silu")),
    ("gemm", ("gemm", "cutlass", "nvjet", "sm90", "sm80", "xmma", "cublas", "splitK")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k.lower() in low for k in keys)), "other elementwise")


def profile_step(runner, batch: int, context: int, steps: int = 5) -> dict:
    """GPU kernel time of one decode step by kernel kind (ms), from a torch profiler trace."""
    from torch.profiler import ProfilerActivity, profile

    time_decode(runner, batch, context, iters=2)  # warm
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        time_decode(runner, batch, context, iters=steps)
    # time_decode runs 3 warm-up steps + `steps` timed ones inside the trace
    n = steps + 3
    kinds, _, count = kernel_times(prof, n)
    return {"batch": batch, "kernels_per_step": count / n, "ms_by_kind": kinds, "kernel_ms": sum(kinds.values())}


def kernel_times(prof, steps: int, kind=kernel_kind) -> tuple[dict, dict, int]:
    """From a torch profiler trace of `steps` steps: GPU milliseconds per step by kernel kind (largest first)
    and by stream, and the number of kernels."""
    kinds: dict[str, float] = {}
    streams: dict[str, float] = {}
    count = 0
    for ev in prof.events():
        if ev.device_type.name != "CUDA" or ev.device_time <= 0:
            continue
        count += 1
        kinds[kind(ev.name)] = kinds.get(kind(ev.name), 0.0) + ev.device_time / 1e3 / steps
        stream = str(getattr(ev, "device_resource_id", "?"))
        streams[stream] = streams.get(stream, 0.0) + ev.device_time / 1e3 / steps
    if not count:
        raise RuntimeError("the profiler recorded no GPU kernels (CUPTI unavailable?)")
    return dict(sorted(kinds.items(), key=lambda x: -x[1])), streams, count


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-8b", choices=sorted(SHAPES))
    ap.add_argument("--batches", default="64,128,256")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--backends", default="triton,triton-unfused,torch")
    ap.add_argument("--profile", type=int, default=0, help="also profile one step of this batch size")
    ap.add_argument("--torch-max-batch", type=int, default=64, help="the torch reference is slow: cap its batch")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    from zipserve.workers.config import EngineConfig
    from zipserve.workers.model_runner import ModelRunner

    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    batches = [int(b) for b in args.batches.split(",")]
    path = config_folder(args.shape)
    sh = SHAPES[args.shape]
    per_req = -(-(args.context + 1) // args.block_size)
    block_bytes = 2 * sh["num_hidden_layers"] * args.block_size * sh["num_key_value_heads"] * sh["head_dim"] * 2
    weights = 2 * (2 * sh["vocab_size"] * sh["hidden_size"] + sh["num_hidden_layers"] * (
        sh["hidden_size"] * (sh["num_attention_heads"] + 2 * sh["num_key_value_heads"]) * sh["head_dim"]
        + sh["num_attention_heads"] * sh["head_dim"] * sh["hidden_size"] + 3 * sh["hidden_size"] * sh["intermediate_size"]))
    room = torch.cuda.mem_get_info(dev)[0] - weights - (6 << 30)  # activations, workspace
    fit = max(1, room // (per_req * block_bytes))
    skipped = [b for b in batches if b > fit]
    batches = [b for b in batches if b <= fit]
    if skipped:
        print(f"batches {skipped} need more KV memory than this card has ({room / 2**30:.0f} GiB free for KV)")
    pages = max(batches) * per_req
    results = {"benchmark": "decode_step", "device": torch.cuda.get_device_name(dev), "shape": args.shape,
               "context": args.context, "block_size": args.block_size, "copy_bandwidth_GBps": bw / 1e9, "rows": [],
               "skipped_batches_no_memory": skipped}
    runner = None
    for backend in args.backends.split(","):
        cfg = EngineConfig.from_kwargs(path, load_format="dummy", backend=backend.split("-")[0],
                                       fused_elementwise=not backend.endswith("-unfused"), block_size=args.block_size,
                                       num_blocks=pages, max_num_seqs=max(batches), max_model_len=args.context + 64)
        del runner
        torch.cuda.empty_cache()
        runner = ModelRunner(cfg, cfg.max_model_len)
        runner.kv_cache.normal_()  # random K/V: never time on zeros
        weight_bytes = sum(p.numel() * p.element_size() for n, p in runner.model.named_parameters()
                           if "embed_tokens" not in n)
        kv_token_bytes = runner.bytes_per_block / args.block_size
        for b in batches:
            if backend == "torch" and b > args.torch_max_batch:
                continue
            try:
                ms = time_decode(runner, b, args.context)
            except torch.OutOfMemoryError:
                results["rows"].append({"backend": backend, "batch": b, "error": "out of memory"})
                torch.cuda.empty_cache()
                continue
            floor_ms = (weight_bytes + b * (args.context + 1) * kv_token_bytes) / bw * 1e3
            row = {"backend": backend, "batch": b, "step_ms": ms, "floor_ms": floor_ms, "fraction_of_floor": floor_ms / ms,
                   "tokens_per_s": b / ms * 1e3}
            results["rows"].append(row)
            print(f"{backend:>14} batch {b:4d}: {ms:8.2f} ms/step  floor {floor_ms:7.2f} ms  "
                  f"{100 * floor_ms / ms:5.1f}% of floor speed  {row['tokens_per_s']:9.0f} tok/s", flush=True)
        if args.profile and backend != "torch":
            prof = profile_step(runner, args.profile, args.context)
            prof["backend"] = backend
            results.setdefault("profiles", []).append(prof)
            print(f"{backend} batch {args.profile}: {prof['kernels_per_step']:.0f} kernels, {prof['kernel_ms']:.2f} ms "
                  "of kernel time per step: " + ", ".join(f"{k} {v:.2f}" for k, v in prof["ms_by_kind"].items()),
                  flush=True)
    os.makedirs(args.out, exist_ok=True)
    name = f"decode_step_{args.shape}_{card_tag(results['device'])}"
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
    for backend in sorted({r["backend"] for r in results["rows"]}):
        rows = [r for r in results["rows"] if r["backend"] == backend and "step_ms" in r]
        ax.plot([r["batch"] for r in rows], [r["step_ms"] for r in rows], "o-", label=backend)
    floor = [r for r in results["rows"] if "floor_ms" in r and r["backend"] == results["rows"][0]["backend"]]
    ax.plot([r["batch"] for r in floor], [r["floor_ms"] for r in floor], "k--", label="bandwidth floor")
    ax.set(xlabel="batch", ylabel="ms per decode step", title=f"{results['shape']}, {results['context']}-token contexts, "
           f"{results['device']}")
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
