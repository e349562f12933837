"""The `zipserve` command line."""

from __future__ import annotations

import argparse
import logging
import sys


def _generate(args: argparse.Namespace) -> int:
    from workers import LLM, SamplingParams

    config = dict(block_size=args.block_size, backend=args.backend)
    if args.device:
        config["device"] = args.device
    if args.max_model_len:
        config["max_model_len"] = args.max_model_len
    llm = LLM(args.model, **config)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, ignore_eos=args.ignore_eos)
    for out in llm.generate(args.prompt, params, use_tqdm=False):
        print(out.text)
        logging.getLogger("zipserve").info("%d prompt + %d generated tokens, finish_reason=%s",
                                           out.num_prompt_tokens, len(out.token_ids), out.finish_reason)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zipserve", description="zipserve: LLM serving with Compressed PagedAttention")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate completions for prompts with a local model folder")
    g.add_argument("prompt", nargs="+", help="one or more prompts")
    g.add_argument("--model", required=True, help="Hugging Face model folder (config.json, safetensors, tokenizer)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--block-size", type=int, default=256)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--backend", default="torch", choices=["torch", "triton"])
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    g.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"zipserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
