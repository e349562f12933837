"""What logprobs, penalties and grammars cost a decode batch: the same requests with and without them.

Every variant runs the same prompts (seeded) and the same number of decode steps on one engine (the
Qwen3-8B shape's 151,936-token vocabulary, random weights), async scheduling on unless the variant says
so; the measure is tokens/s over the steps after the first tokens of all requests (prefill excluded), and
the ratio to the plain variant. `logprobs@1` is one request of the batch asking for 5 logprobs: under a
scheme that synchronizes a step for logprobs, that one request would cost the whole batch its overlap.

    python -m benchmarks.sampling_cost [--shape qwen3-8b] [--requests 256] [--tokens 256]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from benchmarks.provenance import commit, write_result


def variants() -> dict:
    """name -> (per-request SamplingParams kwargs for request i, engine overrides)."""
    lp = lambda k: (lambda i: {"logprobs": k}, {})
    return {
        "plain": (lambda i: {}, {}),
        "plain_sync": (lambda i: {}, {"async_scheduling": False}),
        "logprobs@1": (lambda i: {"logprobs": 5} if i == 0 else {}, {}),
        "logprobs5_all": lp(5),
        "logprobs20_all": lp(20),
        "logprobs5_all_sync": (lambda i: {"logprobs": 5}, {"async_scheduling": False}),
        "penalties_all": (lambda i: {"presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 1.1}, {}),
        "logit_bias_all": (lambda i: {"logit_bias": {100 + i: 2.0, 7: -5.0}}, {}),
        # a grammar on every request (its mask filled on the host per row, each step appends the step
        # before's tokens first); a regex that never has to end, so requests run to max_tokens
        "grammar_all": (lambda i: {"structured": {"regex": "[a-z ]+"}}, {}),
    }


def run_variant(model_dir: str, config: str, name: str, n: int, tokens: int) -> dict:
    from zipserve.workers import LLM, SamplingParams

    per_request, overrides = variants()[name]
    llm = LLM(config_file=config, model=model_dir, load_format="dummy", **overrides)
    eng = llm.engine
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 20000) for _ in range(rng.randrange(100, 500))] for _ in range(n)]
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, SamplingParams(temperature=0.7, top_p=0.95, seed=i, max_tokens=tokens,
                                                  ignore_eos=True, **per_request(i)))
    seen, t0, start_tokens, steps = 0, None, 0, 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            seen += len(o.new_token_ids)
        if t0 is None and seen >= n:  # every request has its first token: decode from here
            t0, start_tokens, steps = time.perf_counter(), seen, 0
        steps += 1
    wall = time.perf_counter() - t0
    decoded = seen - start_tokens
    return {"variant": name, "requests": n, "max_tokens": tokens, "decode_tokens": decoded, "wall_s": wall,
            "tok_per_s": decoded / wall, "steps": steps, "step_ms": 1000 * wall / max(steps, 1)}


def main(argv=None) -> int:
    from benchmarks.decode_step import card_tag, config_folder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--config", default="configs/engine/qwen3-8b-h100.yaml")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--variants", default=",".join(v for v in variants() if v != "grammar_all"))
    ap.add_argument("--tokenizer-from", default=None, help="a model folder whose tokenizer (and vocabulary) to "
                                                           "use: grammar_all needs one")
    ap.add_argument("--tag", default="")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # one variant in a child process
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if args.variant:  # child: one engine per process, so that each variant starts from a clean GPU
        print(json.dumps(run_variant(args.model_dir, args.config, args.variant, args.requests, args.tokens)))
        return 0
    import torch

    model_dir = config_folder(args.shape, tokenizer_from=args.tokenizer_from)
    rows = []
    for name in args.variants.split(","):
        cmd = [sys.executable, "-m", "benchmarks.sampling_cost", "--variant", name, "--model-dir", model_dir,
               "--config", args.config, "--requests", str(args.requests), "--tokens", str(args.tokens)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"variant {name} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{name}: {rows[-1]['tok_per_s']:.0f} tok/s, {rows[-1]['step_ms']:.2f} ms/step", flush=True)
    base = next((r for r in rows if r["variant"] == "plain"), rows[0])
    for r in rows:
        r["vs_plain"] = r["tok_per_s"] / base["tok_per_s"]
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    res = {"benchmark": "sampling_cost", "card": card, "shape": args.shape, "config": args.config,
           "commit": commit(), "command": " ".join(sys.argv),
           "tokenizer_from": args.tokenizer_from, "torch": torch.__version__,
           "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"sampling_cost_{card_tag(card)}{args.tag}.json")
    write_result(path, res, indent=1)
    _plot(res, path[:-5] + ".png")
    print(path)
    return 0


def _plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh([r["variant"] for r in rows], [r["tok_per_s"] for r in rows])
    for i, r in enumerate(rows):
        ax.text(r["tok_per_s"], i, f" {r['vs_plain']:.2f}x, {r['step_ms']:.1f} ms", va="center")
    ax.set_xlabel("decode tokens/s")
    ax.set_title(f"{rows[0]['requests']} requests x {rows[0]['max_tokens']} tokens, {res['shape']}, {res['card']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
