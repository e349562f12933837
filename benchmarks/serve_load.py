"""Streamed chat load against the zipserve HTTP app: every request over real HTTP and server-sent events.

    python -m benchmarks.serve_load --url http://127.0.0.1:8000 --requests 64 --max-tokens 1024
    python -m benchmarks.serve_load --config configs/serve.yaml --model FOLDER --engine '{"load_format": "dummy"}'

With --config the app is started in this process first (Ray + Serve on this machine, one worker per GPU
as the config says) and its worker's engine stats are recorded after the run. Each request is a chat
completion with `stream: true`, `ignore_eos` and usage in the last chunk; per request it records the time
to first token, the gaps between content chunks, the finish reason and the usage. The run also checks the
API around the load: /v1/models names the model, /health answers, a malformed request gets a 400 and
the server goes on serving. Writes JSON and a PNG (streams open and tokens/s over time) to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import threading
import time

log = logging.getLogger("benchmarks.serve_load")

WORDS = ("the state moves to a new value when each step adds the previous two then we check the parity of "
         "every term and write the result before the next line begins").split()


def _prompt(rng: random.Random, words: int) -> str:
    return "Reason step by step. " + " ".join(rng.choice(WORDS) for _ in range(words))


def stream_chat(url: str, model: str, content: str, max_tokens: int, timeout: float = 900,
                deadline: float = float("inf")) -> dict:
    """One streamed chat completion; returns its timings and what the server said."""
    import requests

    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0.6,
            "top_p": 0.95}
    t0 = time.perf_counter()
    rec = {"start": t0, "status": None, "chunks": [], "finish_reason": None, "usage": None, "done": False, "text": ""}
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=timeout) as r:
        rec["status"] = r.status_code
        if r.status_code != 200:
            rec["error"] = r.text[:500]
            return rec
        for line in r.iter_lines(decode_unicode=True):
            if time.perf_counter() > deadline:
                rec["error"] = "abandoned at the run's deadline"
                break
            if not line or not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                rec["done"] = True
                break
            event = json.loads(line[6:])
            if event.get("usage"):
                rec["usage"] = event["usage"]
            for ch in event.get("choices", []):
                if ch.get("delta", {}).get("content"):
                    rec["chunks"].append(time.perf_counter())
                    rec["text"] += ch["delta"]["content"]
                if ch.get("finish_reason"):
                    rec["finish_reason"] = ch["finish_reason"]
    return rec


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


def _pct(xs: list[float]) -> dict:
    xs = sorted(xs)
    if not xs:
        return {}
    return {f"p{p}": xs[min(len(xs) - 1, int(p / 100 * len(xs)))] for p in (50, 90, 99)} | {"mean": sum(xs) / len(xs)}


def run_load(url: str, model: str, n: int, concurrency: int, max_tokens: int, prompt_words: tuple[int, int],
             seed: int = 0, max_seconds: float = float("inf")) -> dict:
    rng = random.Random(seed)
    prompts = [_prompt(rng, rng.randint(*prompt_words)) for _ in range(n)]
    records: list[dict | None] = [None] * n
    next_i = iter(range(n))
    lock = threading.Lock()
    t0 = time.perf_counter()

    def client():
        while True:
            with lock:
                i = next(next_i, None)
            if i is None:
                return
            try:
                records[i] = stream_chat(url, model, prompts[i], max_tokens, deadline=t0 + max_seconds)
            except Exception as e:  # a client-side failure is a failed request, recorded as such
                records[i] = {"status": None, "error": repr(e), "chunks": [], "done": False, "start": time.perf_counter()}

    threads = [threading.Thread(target=client, daemon=True) for _ in range(min(concurrency, n))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in records if r["status"] == 200 and r["done"] and r["finish_reason"] == "length"]
    tokens = sum(r["usage"]["completion_tokens"] for r in ok if r.get("usage"))
    ttft = [r["chunks"][0] - r["start"] for r in ok if r["chunks"]]
    itl = [1000 * (b - a) for r in ok for a, b in zip(r["chunks"], r["chunks"][1:])]
    events = sorted([(r["start"] - t0, 1) for r in ok] + [(r["chunks"][-1] - t0, -1) for r in ok if r["chunks"]])
    open_streams, timeline = 0, []
    for t, d in events:
        open_streams += d
        timeline.append((round(t, 3), open_streams))
    chunk_times = sorted(c - t0 for r in ok for c in r["chunks"])
    return {
        "requests": n, "concurrency": concurrency, "max_tokens": max_tokens, "completed": len(ok),
        "failed": [{k: r.get(k) for k in ("status", "error", "finish_reason", "done")} for r in records if r not in ok],
        "all_usage_exact": all(r.get("usage", {}).get("completion_tokens") == max_tokens for r in ok),
        "wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
        "content_chunks_all": sum(len(r["chunks"]) for r in records),  # finished streams or not
        "abandoned": sum(r.get("error") == "abandoned at the run's deadline" for r in records),
        "ttft_s": _pct(ttft), "inter_chunk_ms": _pct(itl), "streams_open": timeline,
        "chunk_times": chunk_times[:: max(1, len(chunk_times) // 4000)],  # a sample, for the plot
        "tokens_per_plotted_chunk": tokens / max(1, len(chunk_times[:: max(1, len(chunk_times) // 4000)])),
        "sample_text": ok[0]["text"][:300] if ok else None,
    }


def direct_baseline(a: argparse.Namespace, engine: dict, prompt_words: tuple[int, int]) -> dict:
    """The same prompts and sampling through the engine in this process (no Ray, no HTTP): what the
    serving path costs, as a ratio."""
    from cluster.app import resolve_config
    from cluster.cli import load_app_args
    from workers import LLM, SamplingParams

    args = load_app_args(a.config)
    if a.model:
        args["model"] = a.model
    cfg = resolve_config(dict(args, engine=dict(args.get("engine") or {}, **engine)))
    llm = LLM(cfg["model"], config_file=cfg.get("engine_config"), **cfg["engine"])
    rng = random.Random(0)
    texts = [_prompt(rng, rng.randint(*prompt_words)) for _ in range(a.requests)]
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


def launch(config: str | None, model: str | None, engine: dict, port: int, replicas: int | None = None) -> str:
    """Start Ray + Serve here with the app from `config` (cluster.app.build_app) and wait until ready."""
    import ray
    from ray import serve

    from cluster.app import build_app
    from cluster.cli import load_app_args, set_fixed_replicas

    args = load_app_args(config)
    if replicas is not None:
        set_fixed_replicas(args, replicas)
    if model:
        args["model"] = model
    args["engine"] = dict(args.get("engine") or {}, **engine)
    ray.init(include_dashboard=False, ignore_reinit_error=True, log_to_driver=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t = time.perf_counter()
    serve.run(build_app(args), name="zipserve", route_prefix="/", blocking=False)
    log.info("app ready in %.1f s", time.perf_counter() - t)
    return f"http://127.0.0.1:{port}"


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the GPU image may lack matplotlib: redraw later with --plot
        log.warning("no matplotlib: %s not drawn (redraw with --plot)", path)
        return

    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ts = [t for t, _ in result["streams_open"]]
    a.step(ts, [n for _, n in result["streams_open"]], where="post")
    a.set_ylabel("streams open")
    a.set_title(f"zipserve HTTP streamed chat on {result.get('device', '?')}: {result['completed']}/"
                f"{result['requests']} x {result['max_tokens']} tokens, {result['tokens_per_s']:.0f} tok/s")
    ct = result["chunk_times"]
    if ct:
        width = max(0.5, ct[-1] / 60)
        bins = [i * width for i in range(int(ct[-1] / width) + 2)]
        counts, _ = __import__("numpy").histogram(ct, bins=bins)
        b.plot(bins[:-1], counts * result["tokens_per_plotted_chunk"] / width)
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
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--prompt-words", default="50,300")
    p.add_argument("--direct-baseline", action="store_true",
                   help="after the HTTP run, run the same requests through LLM.generate in-process (launch mode)")
    p.add_argument("--max-seconds", type=float, default=float("inf"), help="abandon streams still open after this")
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
    url = a.url or launch(a.config, a.model, engine, a.port, a.replicas)
    import requests

    model = requests.get(f"{url}/v1/models", timeout=60).json()["data"][0]["id"]
    warm = stream_chat(url, model, "warm up", 32)  # first request pays compile / graph capture
    log.info("warm-up request: status %s, finish %s", warm["status"], warm["finish_reason"])
    lo, hi = map(int, a.prompt_words.split(","))
    result = run_load(url, model, a.requests, a.concurrency, a.max_tokens, (lo, hi), max_seconds=a.max_seconds)
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
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(result, stem + ".png")
    log.info("%d/%d streams complete, %.0f tok/s, TTFT p50 %.2f s p99 %.2f s, inter-chunk p50 %.1f ms p99 %.1f ms; "
             "api checks %s -> %s.json/png", result["completed"], a.requests, result["tokens_per_s"],
             result["ttft_s"].get("p50", float("nan")), result["ttft_s"].get("p99", float("nan")),
             result["inter_chunk_ms"].get("p50", float("nan")), result["inter_chunk_ms"].get("p99", float("nan")),
             result["api_checks"], stem)
    return 0 if result["completed"] == a.requests else 1


def main(argv: list[str] | None = None) -> int:
    return run(add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0])).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
