"""The `zipserve` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _generate(args: argparse.Namespace) -> int:
    from zipserve.workers import LLM, SamplingParams

    if args.model is None and not _config_names_model(args.config):
        from zipserve.cluster.default_model import ensure_default_model

        args.model = ensure_default_model()
    flags = dict(block_size=args.block_size, backend=args.backend, device=args.device,
                 max_model_len=args.max_model_len, budget_blocks=args.budget_blocks)
    config = {k: v for k, v in flags.items() if v is not None}
    llm = LLM(args.model, config_file=args.config, **config)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, ignore_eos=args.ignore_eos)
    prompts = args.prompt
    if args.chat:
        if llm.tokenizer is None or not llm.tokenizer.chat_template:
            raise ValueError(f"--chat needs a chat template, and {args.model!r} has none")
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                     tokenize=False) for p in prompts]
    for out in llm.generate(prompts, params, use_tqdm=False):
        print(out.text)
        logging.getLogger("zipserve").info("%d prompt + %d generated tokens, finish_reason=%s",
                                           out.num_prompt_tokens, len(out.token_ids), out.finish_reason)
    return 0


def load_app_args(path: str | None) -> dict:
    """App args from a YAML file: a Serve config (the first application's `args`) or a bare mapping."""
    if path is None:
        return {}
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if isinstance(data, dict) and "applications" in data:
        apps = data["applications"] or []
        if not apps:
            raise ValueError(f"{path}: no applications")
        return dict(apps[0].get("args") or {})
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping")
    return data


def set_fixed_replicas(app_args: dict, n: int) -> None:
    """A fixed worker count replaces the config's autoscaling (else autoscaling would win)."""
    workers = app_args.setdefault("workers", {})
    workers.pop("autoscaling", None)
    workers["num_replicas"] = n


def _serve(args: argparse.Namespace) -> int:
    """Start (or join) Ray on this machine and serve the app until interrupted."""
    import os
    import time

    import ray
    from ray import serve

    from zipserve.cluster.app import build_app, ingress_urls, throughput_env

    app_args = load_app_args(args.config)
    if args.model:
        app_args["model"] = args.model
    if args.replicas is not None:
        set_fixed_replicas(app_args, args.replicas)
    app = build_app(app_args)  # validates the whole config before Ray starts
    joining = bool(os.environ.get("RAY_ADDRESS"))
    if args.throughput_optimized and not joining:
        # Read by every Ray process at its start: set before this starts Ray (cluster/app.py).
        os.environ.update(throughput_env(args.port, (app_args.get("ingress") or {}).get("num_replicas", 1)))
    elif args.throughput_optimized:
        logging.getLogger("zipserve").warning(
            "joining the Ray cluster at RAY_ADDRESS: throughput-optimized Serve is on only if that cluster was "
            "started with its environment (see configs/cluster.yaml)")
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="zipserve", route_prefix="/", blocking=False)
    url = f"http://{args.host}:{args.port}"
    print(f"zipserve: serving at {url}  (try: curl {url}/v1/models; Ctrl-C stops)", flush=True)
    direct = [u for u in ingress_urls(host=args.host) if u != url]
    if direct:
        print(f"zipserve: direct ingress (the ingress replica itself, no proxy hop: faster streaming): "
              f"{', '.join(direct)}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("zipserve: shutting down", flush=True)
    finally:
        serve.shutdown()
    return 0


def _batch(args: argparse.Namespace) -> int:
    from zipserve.cluster.batch import run

    app_args = load_app_args(args.config)
    summary = run(args.input, args.output, model=args.model or app_args.get("model"), engine=app_args.get("engine"),
                  engine_config=app_args.get("engine_config"), min_workers=args.min_workers,
                  max_workers=args.max_workers, num_gpus=args.num_gpus, num_cpus=args.num_cpus,
                  batch_size=args.batch_size)
    print(json.dumps(summary))
    return 0 if summary["errors"] == 0 else 1


def _config_names_model(path: str | None) -> bool:
    if path is None:
        return False
    import yaml

    with open(path) as f:
        return bool((yaml.safe_load(f) or {}).get("model"))


BENCHMARKS = {"routing": "routing policies side by side in the cluster simulator",
              "throughput": "compressed vs full KV vs transformers CB on one GPU (long outputs)",
              "serve_load": "streamed chat requests over HTTP against the app (started here, or --url)",
              "fidelity": "compressed vs full KV on a real model: teacher-forced top-1 agreement, KL, NLL",
              "task_accuracy": "exact-answer accuracy on the register-machine task: full KV vs compressed budgets"}
_BENCHMARK_MODULES = {"fidelity": "quality.fidelity", "task_accuracy": "quality.task_accuracy"}


def _benchmark_module(name: str):
    import importlib

    try:
        return importlib.import_module(f"benchmarks.{_BENCHMARK_MODULES.get(name, name)}")
    except ImportError:  # `benchmarks` sits beside the packages in a source checkout (it is not in the wheel)
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        try:
            return importlib.import_module(f"benchmarks.{_BENCHMARK_MODULES.get(name, name)}")
        except ImportError:
            return None


def _bench(args: argparse.Namespace) -> int:
    module = _benchmark_module(args.target)
    if module is None:
        raise FileNotFoundError("the benchmarks need a source checkout of zipserve")
    rc = module.run(args)
    return rc if isinstance(rc, int) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zipserve", description="zipserve: LLM serving with Compressed PagedAttention")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate completions for prompts with a local model folder")
    g.add_argument("prompt", nargs="+", help="one or more prompts")
    g.add_argument("--model", default=None,
                   help="Hugging Face model folder (config.json, safetensors, tokenizer); default: the embedded "
                        "SmolLM2-135M-Instruct, converted once into ~/.cache/zipserve")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn in the model's chat template")
    g.add_argument("--config", default=None, help="engine config YAML (configs/engine/*.yaml); flags override it")
    g.add_argument("--block-size", type=int, default=None, help="tokens per KV page (default 256)")
    g.add_argument("--budget-blocks", type=int, default=None, help="KV budget in pages per request (default: full KV)")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--backend", default=None, choices=["torch", "triton"])
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    g.set_defaults(func=_generate)

    s = sub.add_parser("serve", help="serve the OpenAI-compatible API (default: the embedded model on this machine)")
    s.add_argument("--config", default=None, help="app YAML (configs/serve.yaml or a bare args mapping)")
    s.add_argument("--model", default=None, help="model folder (default: the config's, else the embedded model)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--replicas", type=int, default=None, help="worker replicas (overrides the config)")
    s.add_argument("--throughput-optimized", action=argparse.BooleanOptionalAction, default=True,
                   help="Ray Serve's throughput mode: gRPC between deployments, the ingress replica serving HTTP "
                        "itself on PORT+1 (the proxy stays on PORT); default on")
    s.set_defaults(func=_serve)

    bt = sub.add_parser("batch", help="batch inference: JSONL requests in, JSONL completions out (resumable)")
    bt.add_argument("input")
    bt.add_argument("output")
    bt.add_argument("--config", default=None, help="app YAML (its model / engine / engine_config are used)")
    bt.add_argument("--model", default=None)
    bt.add_argument("--min-workers", type=int, default=1)
    bt.add_argument("--max-workers", type=int, default=1)
    bt.add_argument("--num-gpus", type=float, default=0, help="GPUs per engine actor (1 on GPU nodes)")
    bt.add_argument("--num-cpus", type=float, default=1)
    bt.add_argument("--batch-size", type=int, default=16, help="rows per engine call")
    bt.set_defaults(func=_batch)

    b = sub.add_parser("bench", help="run a benchmark (from a source checkout)")
    targets = b.add_subparsers(dest="target", required=True, metavar="TARGET")
    for name, help_text in BENCHMARKS.items():
        t = targets.add_parser(name, help=help_text)
        module = _benchmark_module(name)
        if module is not None:
            module.add_arguments(t)
        t.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError, RuntimeError) as e:
        print(f"zipserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
