"""Streamed chat load against the zipserve HTTP app: every request over real HTTP and server-sent events.

    python -m benchmarks.serve_load --url http://127.0.0.1:8000 --requests 64 --max-tokens 1024
    python -m benchmarks.serve_load --config configs/serve.yaml --model FOLDER --engine '{"load_format": "dummy"}'

With --config the app is started in this process first (Ray + Serve on this machine, one worker per GPU
as the config says) and its worker's engine stats are recorded after the run. The load is
benchmarks.loadgen's (streamed chat completions with `ignore_eos`, usage in every chunk; TTFT, per-token
ITL, TPOT, E2E, goodput); benchmarks.serve_compare runs it against vLLM's server side by side. The run also checks the
API around the load: /v1/models names the model, /health answers, a malformed request gets a 400 and
the server goes on serving. Writes JSON and a PNG (streams open and tokens/s over time) to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from benchmarks.provenance import write_result

log = logging.getLogger("benchmarks.serve_load")

def api_checks(url: str, model: str) -> dict:
    import requests

    models = requests.get(f"{url}/v1/models", timeout=30).json()
    health = requests.get(f"{url}/health", timeout=30)
    bad = requests.post(f"{url}/v1/chat/completions", data=b'{"model": "x", "messages": [', timeout=30,
                        headers={"content-type": "application/json"})
    too_many = requests.post(f"{url}/v1/chat/completions", timeout=30, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9})
    return {"models": [m["id"] for m in models.get("data", [])], "health_status": health.status_code,
            "malformed_json_status": bad.status_code, "max_tokens_too_large_status": too_many.status_code,
            "max_tokens_too_large_error": too_many.json().get("error", {}).get("message")}


def direct_baseline(a: argparse.Namespace, engine: dict, prompt_words: tuple[int, int]) -> dict:
    """The same prompts and sampling through the engine in this process (no Ray, no HTTP): what the
    serving path costs, as a ratio."""
    from zipserve.cluster.app import resolve_config
    from zipserve.cluster.cli import load_app_args
    from benchmarks import loadgen
    from zipserve.workers import LLM, SamplingParams

    args = load_app_args(a.config)
    if a.model:
        args["model"] = a.model
    cfg = resolve_config(dict(args, engine=dict(args.get("engine") or {}, **engine)))
    llm = LLM(cfg["model"], config_file=cfg.get("engine_config"), **cfg["engine"])
    texts = loadgen.make_prompts(a.requests, prompt_words)
    tok = llm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
               for t in texts]
    params = SamplingParams(temperature=0.6, top_p=0.95, max_tokens=a.max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=32, ignore_eos=True), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return {"wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall, "stats": llm.engine.stats()}


def launch(config: str | None, model: str | None, engine: dict, port: int, replicas: int | None = None,
           throughput_optimized: bool = True, workers: dict | None = None) -> str:
    """Start Ray + Serve here with the app from `config` (cluster.app.build_app) and wait until ready; returns
    the URL to load (the ingress replica's own port in throughput-optimized mode)."""
    import ray
    from ray import serve

    from zipserve.cluster.app import build_app, ingress_urls, throughput_env
    from zipserve.cluster.cli import load_app_args, set_fixed_replicas

    args = load_app_args(config)
    if replicas is not None:
        set_fixed_replicas(args, replicas)
    if model:
        args["model"] = model
    args["engine"] = dict(args.get("engine") or {}, **engine)
    args["workers"] = dict(args.get("workers") or {}, **(workers or {}))
    if throughput_optimized:
        os.environ.update(throughput_env(port, (args.get("ingress") or {}).get("num_replicas", 1)))
    ray.init(include_dashboard=False, ignore_reinit_error=True, log_to_driver=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t = time.perf_counter()
    serve.run(build_app(args), name="zipserve", route_prefix="/", blocking=False)
    log.info("app ready in %.1f s", time.perf_counter() - t)
    urls = ingress_urls(host="127.0.0.1") if throughput_optimized else []
    return urls[0] if urls else f"http://127.0.0.1:{port}"


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the GPU image may lack matplotlib: redraw later with --plot
        log.warning("no matplotlib: %s not drawn (redraw with --plot)", path)
        return
    tl = result["timeline"]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a.step([t for t, _, _ in tl], [n for _, _, n in tl], where="post")
    a.set_ylabel("streams open")
    a.set_title(f"zipserve HTTP streamed chat on {result.get('device', '?')}: {result['requests_complete']}/"
                f"{result['requests']} x {result['max_tokens']} tokens, {result['tokens_per_s']:.0f} tok/s")
    b.plot([t for t, _, _ in tl], [v for _, v, _ in tl])
    b.set_ylabel("tokens/s (streamed)")
    b.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--url", default=None, help="a running server; default: start the app from --config here")
    p.add_argument("--config", default=None, help="app YAML (as for `zipserve serve --config`)")
    p.add_argument("--model", default=None)
    p.add_argument("--shape", default=None, help="serve random weights of this shape (benchmarks.decode_step."
                   "SHAPES) with the tokenizer of --tokenizer-from; implies load_format dummy")
    p.add_argument("--tokenizer-from", default=None, help="model folder whose tokenizer --shape uses")
    p.add_argument("--engine", default="{}", help="JSON EngineConfig overrides for the launched app")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=None, help="fixed worker count (replaces autoscaling)")
    p.add_argument("--throughput-optimized", action=argparse.BooleanOptionalAction, default=True,
                   help="Ray Serve's throughput mode, loading the ingress replica's own port (cluster/app.py)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--prompt-words", default="50,300")
    p.add_argument("--direct-baseline", action="store_true",
                   help="after the HTTP run, run the same requests through LLM.generate in-process (launch mode)")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="abandon streams still open after this")
    p.add_argument("--processes", type=int, default=4, help="load generator processes")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--tag", default=None, help="result file suffix (default: the card's name or 'cpu')")
    p.add_argument("--plot", default=None, help="only redraw the PNG of this result JSON")
    return p


def run(a: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.plot:
        with open(a.plot) as f:
            plot(json.load(f), a.plot.removesuffix(".json") + ".png")
        return 0
    engine = json.loads(a.engine)
    if a.shape:
        from benchmarks.decode_step import config_folder

        a.model = config_folder(a.shape, tokenizer_from=a.tokenizer_from)
        engine["load_format"] = "dummy"
    url = a.url or launch(a.config, a.model, engine, a.port, a.replicas, a.throughput_optimized)
    import requests

    model = requests.get(f"{url}/v1/models", timeout=60).json()["data"][0]["id"]
    from benchmarks import loadgen
    from benchmarks.serve_compare import _warm

    _warm(url, "server")  # the first request pays compilation / graph capture
    lo, hi = map(int, a.prompt_words.split(","))
    result = loadgen.run(url, model, loadgen.make_prompts(a.requests, (lo, hi)), a.concurrency, a.max_tokens,
                         max_s=a.max_seconds, processes=a.processes)
    result["requests"] = a.requests
    result["api_checks"] = api_checks(url, model)
    device = "cpu"
    try:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    result |= {"benchmark": "serve_load", "device": device, "model": model, "shape": a.shape, "url": url,
               "config": a.config, "engine_overrides": engine}
    if not a.url:
        from ray import serve

        result["worker_stats"] = serve.get_deployment_handle("EngineWorker", app_name="zipserve").stats.remote().result()
        if a.direct_baseline:
            import ray

            serve.shutdown()
            ray.shutdown()  # frees the worker's GPU for the in-process engine
            result["direct"] = direct_baseline(a, engine, (lo, hi))
            result["http_over_direct"] = result["tokens_per_s"] / result["direct"]["tokens_per_s"]
            log.info("the same requests through LLM.generate in-process: %.0f tok/s; HTTP reached %.0f%% of it",
                     result["direct"]["tokens_per_s"], 100 * result["http_over_direct"])
    from benchmarks.decode_step import card_tag

    tag = a.tag or (card_tag(device) if device != "cpu" else "cpu")
    os.makedirs(a.out_dir, exist_ok=True)
    stem = os.path.join(a.out_dir, f"serve_load_{tag}")
    write_result(stem + ".json", result, indent=1)
    plot(result, stem + ".png")
    itl = result["itl_ms_per_token"]
    log.info("%d/%d streams complete, %.0f tok/s, TTFT p50 %.2f s p99 %.2f s, ITL p50 %.1f ms p99 %.1f ms per token; "
             "api checks %s -> %s.json/png", result["requests_complete"], a.requests, result["tokens_per_s"],
             result["ttft_s"].get("p50", float("nan")), result["ttft_s"].get("p99", float("nan")),
             itl.get("p50", float("nan")), itl.get("p99", float("nan")), result["api_checks"], stem)
    return 0 if result["requests_complete"] == a.requests else 1


def main(argv: list[str] | None = None) -> int:
    return run(add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0])).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
