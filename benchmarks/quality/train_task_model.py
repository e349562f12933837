"""Train a small Qwen3-architecture model on a register-machine task (benchmarks/quality/task.py).

    python -m benchmarks.quality.train_task_model --minutes 8 --mode registers --out benchmarks/quality/models/registers

Plain PyTorch over transformers' Qwen3ForCausalLM (the independent implementation our engine is tested
against), fp32 master weights under bf16 autocast, AdamW, warmup then cosine decay over the time budget
(the schedule follows wall time, so a run of any length ends annealed). Every batch has one step count
(drawn uniformly from [min_steps, max_steps]), so its rows have equal length and need no padding; the
batch holds about `--batch-tokens` tokens. The loss covers the trace and answer only (prompts are random).

`--curriculum F` starts with short problems: over the first fraction F of the run (of the time budget, or
of `--train-steps` if that ends it sooner) the largest step count a batch may draw rises linearly from
`--curriculum-start` (default 12: most lines then read their entry from the prompt) to `--max-steps`;
after that batches are uniform over [min_steps, max_steps] as without it. While the cap is below
`--min-steps`, the floor drops to the cap (such batches all have exactly cap steps). Each history row
records the cap at that point (`max_steps_cap`).

Progress is measured teacher-forced on held-out long problems: token accuracy and the share of problems
whose every trace token is the model's argmax -- exactly the share greedy decoding solves (given the
prefix, greedy reproduces the reference token by token). Saves an HF folder (bf16 safetensors, the
character tokenizer, config) and train_log.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time

import torch

from benchmarks.quality.task import MODES, build_tokenizer, encode, make_problem
from benchmarks.provenance import write_result

log = logging.getLogger("benchmarks.quality.train_task_model")
SHORT_STEPS = 40


def model_config(tokenizer, args):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=32, hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        max_position_embeddings=args.max_positions, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        torch_dtype="bfloat16")


def encode_problems(tokenizer, problems, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] token ids (prompt + trace + eos; equal lengths required) and labels (-100 on the prompt)."""
    rows, labels = [], []
    for p in problems:
        prompt, trace = encode(tokenizer, p.prompt), encode(tokenizer, p.trace) + [tokenizer.eos_token_id]
        rows.append(prompt + trace)
        labels.append([-100] * len(prompt) + trace)
    return (torch.tensor(rows, device=device), torch.tensor(labels, device=device))


@torch.no_grad()
def teacher_forced(model, ids: torch.Tensor, labels: torch.Tensor) -> dict:
    """Token accuracy, loss, and the share of rows whose every target is the argmax (= greedy solves it)."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=ids.device.type == "cuda"):
        logits = model(input_ids=ids).logits.float()
    pred, tgt = logits[:, :-1].argmax(-1), labels[:, 1:]
    mask = tgt != -100
    ok = (pred == tgt) | ~mask
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][mask], tgt[mask])
    return {"loss": loss.item(), "token_accuracy": (ok & mask).sum().item() / mask.sum().item(),
            "solved": ok.all(1).float().mean().item()}


def steps_cap(args, frac: float) -> int:
    """The largest step count a batch may draw at progress `frac` (0..1 of the run): see --curriculum."""
    if args.curriculum <= 0 or frac >= args.curriculum:
        return args.max_steps
    start = min(args.curriculum_start, args.max_steps)
    return start + int((args.max_steps - start) * frac / args.curriculum)


def train(args) -> dict:
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = build_tokenizer()
    previous = None
    if args.init:  # a second phase: go on from a saved model (its log says what it took so far)
        model = Qwen3ForCausalLM.from_pretrained(args.init, torch_dtype=torch.float32).to(device)
        with open(os.path.join(args.init, "train_log.json")) as f:
            previous = json.load(f)
        if previous["args"].get("mode", "registers") != args.mode:  # transfer: what it learned (reading i=vv, adding) carries over
            log.info("starting from %s, trained on mode %r, for mode %r", args.init, previous["args"].get("mode", "registers"), args.mode)
    else:
        model = Qwen3ForCausalLM(model_config(tokenizer, args)).to(device)
    model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters, %d layers, hidden %d; device %s", n_params / 1e6, args.layers, args.hidden,
             device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    held_out = [encode_problems(tokenizer, [make_problem(random.Random(10_000 + k), args.max_steps, args.registers, args.mode)
                                            for k in range(j, j + 8)], device) for j in range(0, args.eval_problems, 8)]
    rng = random.Random(args.seed)
    budget = args.minutes * 60
    model.eval()
    ms = [teacher_forced(model, i, l) for i, l in held_out]  # the untrained model: where the curve starts
    model.train()
    history = [{"step": 0, "seconds": 0.0, "tokens": 0, **{k: sum(m[k] for m in ms) / len(ms) for k in ms[0]}}]
    step, seen, t0 = 0, 0, time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(total=int(budget), desc="train", unit="s", mininterval=5)
    while (elapsed := time.perf_counter() - t0) < budget and not (args.train_steps and step >= args.train_steps):
        frac = max(elapsed / budget, step / args.train_steps if args.train_steps else 0.0)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        cap = steps_cap(args, frac)
        short = rng.random() < args.short_share  # short problems weigh the first lines (read from the prompt)
        top = min(cap, SHORT_STEPS) if short else cap
        steps = rng.randint(min(args.min_steps, top), top)
        length = len(make_problem(random.Random(0), steps, args.registers, args.mode).prompt) + 15 * steps + 8
        problems = [make_problem(rng, steps, args.registers, args.mode) for _ in range(max(1, args.batch_tokens // length))]
        ids, labels = encode_problems(tokenizer, problems, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, seen = step + 1, seen + ids.numel()
        if (step % args.eval_every == 0 or time.perf_counter() - t0 >= budget
                or (args.train_steps and step >= args.train_steps)):
            model.eval()
            ms = [teacher_forced(model, i, l) for i, l in held_out]
            model.train()
            row = {"step": step, "seconds": round(time.perf_counter() - t0, 1), "tokens": seen, "lr": lr,
                   "max_steps_cap": cap, "train_loss": loss.item(),
                   **{k: sum(m[k] for m in ms) / len(ms) for k in ms[0]}}
            history.append(row)
            log.info("step %d (%.0f s, %.1fM tokens, steps <= %d): train loss %.4f, held-out loss %.4f, "
                     "token acc %.5f, solved %.3f", step, row["seconds"], seen / 1e6, cap, row["train_loss"], row["loss"],
                     row["token_accuracy"], row["solved"])
        bar.update(int(time.perf_counter() - t0) - bar.n)
    bar.close()
    os.makedirs(args.out, exist_ok=True)
    model.config.use_cache = True  # for whoever generates with it
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    summary = {"parameters": n_params, "steps": step, "tokens": seen, "seconds": time.perf_counter() - t0,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "args": vars(args), "history": history}
    if previous is not None:
        summary["previous_phases"] = previous.get("previous_phases", []) + [
            {k: previous[k] for k in ("steps", "tokens", "seconds", "device", "args", "history")}]
        summary["total_seconds"] = summary["seconds"] + sum(p["seconds"] for p in summary["previous_phases"])
    write_result(os.path.join(args.out, "train_log.json"), summary, indent=1)
    log.info("saved %s (%d steps, %.0fM tokens)", args.out, step, seen / 1e6)
    return summary


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--out", default="benchmarks/quality/models/registers")
    ap.add_argument("--minutes", type=float, default=8.0, help="wall-time budget (the LR schedule follows it)")
    ap.add_argument("--train-steps", type=int, default=0, help="stop after this many optimizer steps (0: time only)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--max-positions", type=int, default=4096)
    ap.add_argument("--registers", type=int, default=10)
    ap.add_argument("--mode", default="registers", choices=MODES, help="see task.py")
    ap.add_argument("--init", default=None,
                    help="start from this saved model (a further phase of its training, on its mode or another)")
    ap.add_argument("--short-share", type=float, default=0.0,
                    help=f"share of batches with at most {SHORT_STEPS} steps (weighs the lines read from the prompt)")
    ap.add_argument("--curriculum", type=float, default=0.0,
                    help="over this fraction of the run, the batches' largest step count rises from "
                         "--curriculum-start to --max-steps (0: off)")
    ap.add_argument("--curriculum-start", type=int, default=12)
    ap.add_argument("--min-steps", type=int, default=16)
    ap.add_argument("--max-steps", type=int, default=260)
    ap.add_argument("--batch-tokens", type=int, default=131072)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-problems", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    return ap


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return train(add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0])).parse_args(argv))


if __name__ == "__main__":
    main()
