"""Fidelity of compressed KV on a real model: teacher-forced replay of full-KV greedy continuations.

    python -m benchmarks.quality.fidelity --length 2048 --prompts 8 --budgets 0.12,0.25,0.5
    zipserve bench fidelity ...   (the same)

1. Full KV generates a greedy continuation of `--length` tokens for each prompt (the embedded
   SmolLM2-135M-Instruct by default, chat-templated prompts of varied kinds).
2. The same continuations are replayed, teacher-forced, through a full-KV engine and a compressed engine
   in lockstep (the engines' step observer appends the reference token instead of sampling), so both see
   identical histories and only the compressed engine's cache differs.
3. Per generated position: top-1 agreement of the two next-token distributions, KL(full || compressed),
   and the NLL of the reference token under each. Reported over all positions and over the positions after
   the request's first compression (where compression can matter), per budget (a fraction of prompt +
   length, in pages) and per scoring setting: attention only, + global score, + redundancy, + pooling (the
   paper's full set).

Writes JSON and a PNG (agreement and KL vs budget per setting) to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import time

import torch

from zipserve.workers.config import CompressionConfig
from benchmarks.provenance import write_result

log = logging.getLogger("benchmarks.quality.fidelity")

PROMPTS = [
    "Solve step by step: a train leaves at 9:40 and travels 276 km at 92 km/h. When does it arrive?",
    "Write a detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash table handles collisions, with examples in Python.",
    "List the steps to bake sourdough bread and explain the purpose of each one.",
    "Compute 17 * 23, then 391 / 17, then explain why the answers are related.",
    "Describe the water cycle to a ten-year-old, then to a university student.",
    "Write a dialogue between two chess players analysing the opening of their game.",
    "Summarise the causes of the French Revolution and their long-term effects.",
]

_OFF = dict(use_redundancy=False, use_pooling=False, recent_fraction=0.0, prompt_fraction=0.0)
SETTINGS = {  # cumulative scoring ablations (CompressionConfig keys), + global with half the budget recent, defaults
    "attention": dict(_OFF, use_global_score=False),
    "+global": dict(_OFF, use_global_score=True),
    "+redundancy": dict(_OFF, use_global_score=True, use_redundancy=True),
    "+pooling": dict(_OFF, use_global_score=True, use_redundancy=True, use_pooling=True),
    "+recent": dict(_OFF, use_global_score=True, recent_fraction=0.5),
    # the shipped defaults, stated in full so results say what they were
    "default": {k: getattr(CompressionConfig(), k) for k in ("use_global_score", "score_decay", *_OFF,
                                                                 "num_sink_tokens", "recent_window")},
}


def setting_knobs(name: str, query_window: int, overrides: dict) -> tuple[dict, str]:
    """A scoring setting's compression options with `overrides` on top, and its label in results."""
    return (dict(SETTINGS[name], query_window=query_window, **overrides),
            name + "".join(f" {k}={v}" for k, v in overrides.items()))


class Replay:
    """Step observer for one engine: forces the reference tokens and keeps each position's log-probs."""

    def __init__(self, reference: dict[str, list[int]]):
        self.reference = reference
        self.rows: dict[tuple[str, int], torch.Tensor] = {}
        self.first_compression: dict[str, int] = {}

    def __call__(self, seqs, logits: torch.Tensor) -> list[int]:
        logp = logits.float().log_softmax(-1)  # stays on the engine's device: no sync per step
        forced = []
        for row, seq in enumerate(seqs):
            k = seq.num_tokens - seq.num_prompt_tokens  # tokens generated so far = the position predicted now
            self.rows[(seq.request_id, k)] = logp[row]
            if seq.num_compressions and seq.request_id not in self.first_compression:
                self.first_compression[seq.request_id] = k
            forced.append(self.reference[seq.request_id][k])
        return forced


def replay(llm_full, llm_comp, prompts: list[list[int]], reference: list[list[int]]) -> dict:
    """Lockstep teacher-forced replay; returns the metrics over all positions and after first compression."""
    from zipserve.workers import SamplingParams

    ref = {f"r{i}": r for i, r in enumerate(reference)}
    observers = []
    for llm in (llm_full, llm_comp):
        obs = Replay(ref)
        llm.engine.step_observer = obs
        observers.append(obs)
        for i, p in enumerate(prompts):
            llm.engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=len(reference[i]),
                                                              ignore_eos=True))
    full_obs, comp_obs = observers
    device = llm_full.engine.runner.device
    sums = torch.zeros(2, 5, dtype=torch.float64, device=device)  # [all, after] x [n, agree, kl, nll_full, nll_comp]
    finals = [{}, {}]  # each engine's finished outputs: they must be the reference (the replay was forced)
    while llm_full.engine.has_unfinished_requests() or llm_comp.engine.has_unfinished_requests():
        for llm, done in zip((llm_full, llm_comp), finals):
            if llm.engine.has_unfinished_requests():
                done.update((o.request_id, list(o.token_ids)) for o in llm.engine.step() if o.finished)
        keys = [k for k in comp_obs.rows if k in full_obs.rows]  # positions both engines have seen
        if not keys:
            continue
        p = torch.stack([full_obs.rows.pop(k) for k in keys])
        q = torch.stack([comp_obs.rows.pop(k) for k in keys])
        tok = torch.tensor([ref[r][k] for r, k in keys], device=p.device)[:, None]
        after = torch.tensor([k >= comp_obs.first_compression.get(r, math.inf) for r, k in keys],
                             dtype=torch.float64, device=p.device)
        cols = torch.stack([torch.ones_like(after), (p.argmax(-1) == q.argmax(-1)).double(),
                            (p.exp() * (p - q)).sum(-1).double(), -p.gather(1, tok)[:, 0].double(),
                            -q.gather(1, tok)[:, 0].double()], 1)  # [positions, 5]
        sums[0] += cols.sum(0)
        sums[1] += (cols * after[:, None]).sum(0)
    for llm in (llm_full, llm_comp):
        llm.engine.step_observer = None
    out = {}
    for g, (n, agree, kl, nf, nc) in zip(("all", "after"), sums.tolist()):
        n = int(n)
        out[g] = {"positions": n, "top1_agreement": agree / n if n else None, "mean_kl": kl / n if n else None,
                  "nll_full": nf / n if n else None, "nll_compressed": nc / n if n else None,
                  "nll_increase": (nc - nf) / n if n else None}
    out["compressions"] = llm_comp.engine.stats().get("compressions", 0)
    if any(done != ref for done in finals):
        raise RuntimeError("the replay was not teacher-forced: an engine's output differs from the reference")
    return out


def run(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from tqdm import tqdm

    from zipserve.workers import LLM, SamplingParams

    model = args.model
    if model is None:
        from zipserve.cluster.default_model import ensure_default_model

        model = ensure_default_model()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    texts = (PROMPTS * (1 + args.prompts // len(PROMPTS)))[: args.prompts]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False) for t in texts]
    # One pool per engine, sized for every request at full length (two engines share the card in lockstep).
    longest = max(map(len, prompts)) + args.length
    pages = len(prompts) * (-(-longest // args.block_size) + 2)
    common = dict(block_size=args.block_size, max_model_len=longest, max_num_seqs=args.prompts, num_blocks=pages,
                  dtype=args.dtype)
    if args.device:
        common["device"] = args.device
    full = LLM(model, **common)
    t0 = time.perf_counter()
    reference = [o.token_ids for o in full.generate(prompts, SamplingParams(temperature=0, max_tokens=args.length,
                                                                            ignore_eos=True), use_tqdm=False)]
    log.info("reference continuations: %d x %d tokens in %.0f s", len(prompts), args.length, time.perf_counter() - t0)
    mean_total = sum(len(p) for p in prompts) / len(prompts) + args.length
    device_name = torch.cuda.get_device_name(0) if full.engine.runner.device.type == "cuda" else "cpu"
    results = {"benchmark": "fidelity", "model": os.path.basename(model.rstrip("/")), "device": device_name,
               "prompts": len(prompts), "length": args.length, "block_size": args.block_size, "dtype": args.dtype,
               "mean_prompt_tokens": mean_total - args.length, "runs": []}
    budgets = [float(b) for b in args.budgets.split(",")]
    settings = args.settings.split(",")
    stem = os.path.join(args.out, f"fidelity_{results['model'].lower()}_{args.length}{args.tag}")
    overrides = json.loads(args.overrides) if args.overrides else {}
    bar = tqdm(total=len(budgets) * len(settings), desc="fidelity", unit="run")
    for frac in budgets:
        blocks = max(1, round(frac * mean_total / args.block_size))
        for name in settings:
            knobs, label = setting_knobs(name, args.query_window, overrides)
            comp = LLM(model, budget_blocks=blocks, compression=knobs, **common)
            t = time.perf_counter()
            metrics = replay(full, comp, prompts, reference)
            row = {"budget_fraction": frac, "budget_blocks": blocks, "budget_tokens": blocks * args.block_size,
                   "setting": label, "seconds": time.perf_counter() - t, **metrics}
            results["runs"].append(row)
            a = metrics["after"]
            log.info("budget %.0f%% (%d pages) %-12s: top-1 %.3f (after first compression %.3f), KL %.4f, NLL +%.4f, "
                     "%d compressions", 100 * frac, blocks, label, metrics["all"]["top1_agreement"],
                     a["top1_agreement"] or float("nan"), metrics["all"]["mean_kl"], metrics["all"]["nll_increase"],
                     metrics["compressions"])
            bar.update(1)
            del comp
            write(results, stem)  # after every run: a cut-off run keeps what it measured
    bar.close()
    plot(results, stem + ".png")
    return results


def join_parts(paths: list[str], keys: tuple[str, ...]) -> dict:
    """One result from several processes' JSON files whose `keys` agree (the same workload); runs concatenated."""
    parts = []
    for p in paths:
        with open(p) as f:
            parts.append(json.load(f))
    for p, part in zip(paths[1:], parts[1:]):
        if any(part.get(k) != parts[0].get(k) for k in keys):
            raise ValueError(f"{p} measured a different workload than {paths[0]}")
    return dict(parts[0], runs=[r for part in parts for r in part["runs"]])


def merge(paths: list[str], out: str, tag: str = "") -> dict:
    """One table and plot from several fidelity runs of the same prompts and pages."""
    results = join_parts(paths, ("model", "prompts", "length", "block_size", "mean_prompt_tokens", "device"))
    stem = os.path.join(out, f"fidelity_{results['model'].lower()}_{results['length']}{tag}")
    write(results, stem)
    plot(results, stem + ".png")
    return results


def recent_share(run: dict) -> float | None:
    """A run's protected recent tail as a share of its budget (from its label, its knobs or its named
    setting's), or None when it has none."""
    m = re.search(r"recent_fraction=([\d.]+)", run["setting"])
    if m:
        return float(m.group(1))
    m = re.search(r"recent_window=(\d+)", run["setting"])
    if m and run.get("budget_tokens"):
        return int(m.group(1)) / run["budget_tokens"]
    knobs = run.get("compression") or SETTINGS.get(run["setting"].split(" ")[0], {})
    return knobs.get("recent_fraction") or None


def without_recent(label: str) -> str:
    """A label less its tail: the settings that are + global with a tail of their own become + global."""
    label = re.sub(r"\s*recent_(window|fraction)=[\d.]+", "", label)
    name, _, rest = label.partition(" ")
    return " ".join(["+global" if name in ("+recent", "default") else name] + ([rest] if rest else []))


def tail_sweep(runs: list[dict], label=lambda r: r["setting"]) -> dict:
    """{(budget fraction, setting less its tail): [(tail share, run), ...] by share}: the recent-tail sweep,
    each setting's own run with no tail as its point at 0. Only groups with a tail in them."""
    groups: dict = {}
    for r in runs:
        if r["setting"] == "full KV":
            continue
        share = recent_share(r)
        if share is not None or label(r) == without_recent(label(r)):
            groups.setdefault((r["budget_fraction"], without_recent(label(r))), []).append((share or 0.0, r))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in sorted(groups.items()) if any(s for s, _ in v)}


def write(results: dict, stem: str) -> None:
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    write_result(stem + ".json", results, indent=1)


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    runs = results["runs"]
    sweep = tail_sweep(runs)  # a recent-tail sweep: its own panel
    swept = [r for points in sweep.values() for _, r in points]
    fig, axes = plt.subplots(1, 3 if sweep else 2, figsize=(16 if sweep else 11, 4))
    a, b = axes[0], axes[1]
    for name in dict.fromkeys(r["setting"] for r in runs):
        rows = sorted((r for r in runs if r["setting"] == name), key=lambda r: r["budget_fraction"])
        if len(rows) < 2 and rows[0] in swept:  # a single point of the sweep: the third panel has it
            continue
        x = [100 * r["budget_fraction"] for r in rows]
        a.plot(x, [r["all"]["top1_agreement"] for r in rows], "o-", label=name)
        b.plot(x, [r["all"]["mean_kl"] for r in rows], "o-", label=name)
    a.set(xlabel="budget (% of prompt + output)", ylabel="top-1 agreement with full KV")
    b.set(xlabel="budget (% of prompt + output)", ylabel="mean KL(full || compressed)", yscale="log")
    a.legend(fontsize=7)
    for (frac, base), points in sweep.items():
        axes[2].plot([s for s, _ in points], [r["all"]["mean_kl"] for _, r in points], "o-",
                     label=f"{100 * frac:.0f}% budget, {base}")
    if sweep:
        axes[2].set(xlabel="recent tail / budget (1 = a sliding window)", ylabel="mean KL(full || compressed)",
                    yscale="log")
        axes[2].legend(fontsize=7)
    fig.suptitle(f"{results['model']}: teacher-forced replay of {results['prompts']} x {results['length']} greedy "
                 f"tokens, pages of {results['block_size']} ({results['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--length", type=int, default=2048, help="greedy tokens per prompt")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--budgets", default="0.12,0.25,0.5", help="budgets as fractions of prompt + length")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"scoring settings: {', '.join(SETTINGS)}")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--query-window", type=int, default=16)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="float32", help="float32 (default: the CPU and GPU figures compare) or bfloat16")
    ap.add_argument("--overrides", default=None, help='compression options over each setting, as JSON: {"recent_window": 256}')
    ap.add_argument("--tag", default="", help="suffix of the output files (parallel processes)")
    ap.add_argument("--merge", nargs="+", default=None, help="join these JSON files (same prompts) instead of running")
    ap.add_argument("--out", default="benchmarks/results")
    return ap


def main(argv=None):
    args = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0])).parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args.tag)
    return run(args)


if __name__ == "__main__":
    main()
