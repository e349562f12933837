"""Tensor parallelism on GPUs: TP=N against TP=1, tokens and throughput, same run, same cards.

    python -m benchmarks.tensor_parallel --tp 2 --check-shape qwen3-1.7b --bench-shape qwen3-8b

1. Equality: a random-weight model of `--check-shape` (float32, so reduction order does not flip
   near-tied argmaxes), `--prompts` prompts, the first `--check-tokens` greedy tokens at TP=1 and TP=N.
2. Throughput: `--bench-shape` in bf16, `--requests` x `--length` greedy tokens (ignore_eos), compressed
   engine (budget 2 x 256, so it compresses), TP=1 and TP=N; output tokens/s and their ratio. Both eager:
   TP=N has no CUDA graphs yet (the collectives are not captured).
Each configuration runs in its own process (one tensor-parallel engine per process). JSON + PNG to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from benchmarks.provenance import write_result


def _one(spec: dict) -> dict:
    """Run one configuration (in this process) and return its tokens or throughput."""
    from benchmarks.decode_step import config_folder
    from benchmarks.throughput import workload
    from zipserve.workers import LLM, SamplingParams

    path = config_folder(spec["shape"], max_pos=spec["max_len"])
    llm = LLM(path, load_format="dummy", dtype=spec["dtype"], tensor_parallel_size=spec["tp"], block_size=256,
              max_model_len=spec["max_len"], max_num_seqs=spec["requests"], enforce_eager=spec["eager"],
              budget_blocks=spec.get("budget"), gpu_memory_utilization=0.85)
    from benchmarks.decode_step import SHAPES

    prompts = workload(spec["requests"], SHAPES[spec["shape"]]["vocab_size"])
    params = SamplingParams(temperature=0, max_tokens=spec["length"], ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t
    tokens = sum(len(o.token_ids) for o in outs)
    result = {**spec, "seconds": seconds, "output_tokens": tokens, "tokens_per_s": tokens / seconds,
              "device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count()}
    if spec.get("keep_tokens"):
        result["token_ids"] = [list(o.token_ids) for o in outs]
    print("RESULT " + json.dumps(result), flush=True)  # before the shutdown, which may be slow
    if hasattr(llm.engine, "shutdown"):
        llm.engine.shutdown()
    return result


def _spawn(spec: dict) -> dict:
    try:
        out = subprocess.run([sys.executable, "-m", "benchmarks.tensor_parallel", "--one", json.dumps(spec)],
                             capture_output=True, text=True, timeout=300)
        stdout, stderr = out.stdout, out.stderr
    except subprocess.TimeoutExpired as e:  # a slow shutdown after the result was printed
        stdout, stderr = (x.decode() if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr))
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"run {spec} failed:\n{stderr[-3000:]}")


def run(args) -> dict:
    res = {"benchmark": "tensor_parallel", "tp": args.tp, "runs": []}
    check = dict(shape=args.check_shape, dtype="float32", max_len=1024, requests=args.prompts,
                 length=args.check_tokens, eager=True, keep_tokens=True)
    a, b = _spawn(dict(check, tp=1)), _spawn(dict(check, tp=args.tp))
    agree = [next((k for k, (x, y) in enumerate(zip(p, q)) if x != y), len(p))
             for p, q in zip(a.pop("token_ids"), b.pop("token_ids"))]
    res["check"] = {"shape": args.check_shape, "prompts": args.prompts, "tokens": args.check_tokens,
                    "identical": all(n == args.check_tokens for n in agree), "agreeing_prefix": agree}
    print(f"equality ({args.check_shape}, float32): TP={args.tp} == TP=1 for the first {args.check_tokens} tokens: "
          f"{res['check']['identical']} (agreeing prefixes {agree})", flush=True)
    bench = dict(shape=args.bench_shape, dtype="bfloat16", max_len=args.length + 1024, requests=args.requests,
                 length=args.length, budget=2)
    for tp, eager in ((1, True), (args.tp, True)):
        r = _spawn(dict(bench, tp=tp, eager=eager))
        res["runs"].append(r)
        res["device"] = r["device"]
        print(f"{args.bench_shape} TP={tp}{' eager' if eager else ' graphs'}: {r['tokens_per_s']:.0f} tok/s "
              f"({r['output_tokens']} tokens in {r['seconds']:.1f} s)", flush=True)
    base = res["runs"][0]["tokens_per_s"]
    for r in res["runs"]:
        r["ratio_to_tp1_eager"] = r["tokens_per_s"] / base
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"tensor_parallel_{args.bench_shape}_tp{args.tp}")
    write_result(stem + ".json", res, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        labels = [f"TP={r['tp']}\n{'eager' if r['eager'] else 'CUDA graphs'}" for r in res["runs"]]
        ax.bar(labels, [r["tokens_per_s"] for r in res["runs"]])
        ax.set(ylabel="output tokens/s", title=f"{args.bench_shape}, {args.requests} x {args.length} tokens, "
                                               f"budget 2 x 256\n{res['device']} x {res['runs'][-1]['gpus']}")
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=100)
    except ImportError:
        pass
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--check-shape", default="qwen3-1.7b")
    ap.add_argument("--check-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--bench-shape", default="qwen3-8b")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        _one(json.loads(args.one))
        return None
    return run(args)


if __name__ == "__main__":
    main()
