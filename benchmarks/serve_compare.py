"""zipserve's HTTP app against vLLM's OpenAI server, side by side on one card, with one load generator.

    python -m benchmarks.serve_compare --systems zipserve,zipserve-full,vllm --shape qwen3-8b \\
        --tokenizer-from TOKENIZER_DIR --points 2048:256:requests,8192:256:window:120:120 --tag part1

Every system gets the same model shape (random bf16 weights), tokenizer, chat template, prompts and sampling,
driven by benchmarks.loadgen over real HTTP; the systems run one after another on the same GPU (each takes
the whole card). Points are `max_tokens:concurrency:requests[:n]` (n requests to their end, n defaults to
concurrency) or `max_tokens:concurrency:window:warmup_s:window_s` (streams kept busy, a new request as one
finishes, tokens counted over the window: the same span for every system, for runs too long to finish).

Systems:
  zipserve        the Ray Serve app (configs/serve-gpu.yaml: compressed KV), one GPU worker
  zipserve-full   the same app with full KV (budget_blocks null)
  zipserve-reserved  compressed, but requests beyond the reservations wait instead of borrowing reserved
                  pages (borrow_reserved_pages false: the engine's behaviour before borrowing)
  NAME@default    either of those on Ray Serve's default path (proxy hop, actor calls) instead of its
                  throughput-optimized mode (direct ingress, gRPC; cluster/app.py throughput_env)
  zipserve-direct the compressed engine in this process (no Ray, no HTTP): the same points, same windows,
                  requests added and stepped directly (what the serving path costs, as a ratio)
  vllm            `vllm.entrypoints.openai.api_server` (--vllm-site: where the vLLM bundle is unpacked)
Also: --headroom (the client against benchmarks/sse_server.py, at a fixed rate) and --vllm-bench (vLLM's
own `vllm bench serve` at one point against every HTTP system, after our client's points: a second client). Each call writes one
part; --merge joins parts into one JSON + PNG.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from benchmarks.provenance import commit, write_result

log = logging.getLogger("benchmarks.serve_compare")


def parse_point(spec: str) -> dict:
    parts = spec.split(":")
    p = {"name": spec, "max_tokens": int(parts[0]), "concurrency": int(parts[1]), "mode": parts[2]}
    if p["mode"] == "requests":
        p["requests"] = int(parts[3]) if len(parts) > 3 else p["concurrency"]
    elif p["mode"] == "window":
        p["warmup_s"], p["window_s"] = float(parts[3]), float(parts[4])
    else:
        raise ValueError(f"point {spec!r}: mode must be requests or window")
    return p


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_points(url: str, model: str, points: list[dict], processes: int, prompt_words: tuple[int, int],
               slo: tuple[float, float]) -> dict:
    from benchmarks import loadgen

    out = {}
    for p in points:
        n = p.get("requests", p["concurrency"] * 8)
        prompts = loadgen.make_prompts(n, prompt_words, seed=1)
        log.info("point %s ...", p["name"])
        r = loadgen.run(url, model, prompts, p["concurrency"], p["max_tokens"], mode=p["mode"],
                        warmup_s=p.get("warmup_s", 0.0), window_s=p.get("window_s", float("inf")),
                        processes=processes, slo_ttft_s=slo[0], slo_tpot_ms=slo[1])
        log.info("point %s: %.0f tok/s, TTFT p50 %.2f s, ITL p50 %.1f ms/token, statuses %s", p["name"],
                 r["tokens_per_s"], r["ttft_s"].get("p50", float("nan")), r["itl_ms_per_token"].get("p50", float("nan")),
                 r["statuses"])
        out[p["name"]] = r
    return out


_ZIPSERVE_ENGINES = {"zipserve": {}, "zipserve-full": {"budget_blocks": None},
                     "zipserve-reserved": {"borrow_reserved_pages": False}}


def run_zipserve(a, model_dir: str, points: list[dict], overrides: dict, throughput_optimized: bool) -> dict:
    import ray
    from ray import serve

    from benchmarks.serve_load import launch

    engine = {"load_format": "dummy"} | overrides
    workers = {}
    if a.replicas > 1:  # replicas share this machine's GPU: each a fraction of it and a fixed KV pool
        import torch

        if torch.cuda.is_available():
            workers["num_gpus"] = 1 / a.replicas
        engine["kv_cache_memory_gb"] = a.kv_gb
    t = time.monotonic()
    url = launch(a.config, model_dir, engine, a.port, replicas=a.replicas, throughput_optimized=throughput_optimized,
                 workers=workers)
    _wait_http(url, 900)
    started = time.monotonic() - t
    _warm(url, "zipserve")
    model = _model_name(url)
    killer = _Killer(a.kill_after_s) if a.kill_after_s is not None else None
    res = {"start_s": started, "replicas": a.replicas,
           "points": run_points(url, model, points, a.processes, a.prompt_words, a.slo)}
    if killer is not None:
        res["killed"] = killer.result()
        res["killed"]["migrated_samples"] = _get_json(url + "/health").get("migrated_samples")
    if a.vllm_bench:  # vLLM's own client as a second opinion, after our client's points, as for vLLM's server
        res["vllm_bench"] = vllm_bench(a, _vllm_env(a), url, model, model_dir, parse_point(a.vllm_bench))
    res["worker_stats"] = serve.get_deployment_handle("EngineWorker", app_name="zipserve").stats.remote().result()
    res["env"] = {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE")}
    res["url"] = url
    serve.shutdown()
    ray.shutdown()
    for k in res["env"]:
        os.environ.pop(k)
    return res


class _Killer:
    """Kills a worker replica that holds requests `after_s` seconds from now (the load is running by then),
    as a crash would: no drain, no restart of that actor (Serve starts a replacement)."""

    def __init__(self, after_s: float):
        self.info: dict = {"after_s": after_s}
        self.thread = threading.Thread(target=self._run, args=(after_s,), name="kill-worker", daemon=True)
        self.thread.start()

    def _run(self, after_s: float) -> None:
        import ray

        time.sleep(after_s)  # a benchmark's schedule, not a test's wait
        try:
            from ray import serve

            names = [x["name"] for x in ray.util.list_named_actors(all_namespaces=True)
                     if x["namespace"] == "serve" and "zipserve#EngineWorker" in x["name"]]
            stats = serve.get_deployment_handle("EngineWorker", app_name="zipserve").stats.remote().result(timeout_s=30)
            asked = next((n for n in names if n.endswith(stats["replica"])), names[0])
            busy = stats["running"] + stats["waiting"] > 0
            victim = asked if busy or len(names) == 1 else next(n for n in names if n != asked)
            self.info.update(victim=victim, replicas=names, asked=asked, asked_running=stats["running"],
                             asked_waiting=stats["waiting"])
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            self.info["killed_at"] = time.time()
            log.info("killed worker replica %s", victim)
        except Exception as e:  # noqa: BLE001 -- recorded: the figure says the kill did not happen
            log.exception("could not kill a worker replica")
            self.info["error"] = repr(e)

    def result(self) -> dict:
        self.thread.join(60)
        return self.info


def _get_json(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def run_direct(a, model_dir: str, points: list[dict]) -> dict:
    """The same points through the engine in this process: requests added and stepped directly, a new one as
    one finishes, tokens counted as the engine produces them, over the same windows."""
    from benchmarks import loadgen
    from zipserve.cluster.app import resolve_config
    from zipserve.cluster.cli import load_app_args
    from zipserve.workers import LLM, SamplingParams

    args = load_app_args(a.config)
    args["model"] = model_dir
    cfg = resolve_config(dict(args, engine=dict(args.get("engine") or {}, load_format="dummy")))
    llm = LLM(cfg["model"], config_file=cfg.get("engine_config"), **cfg["engine"])
    tok = llm.tokenizer
    llm.generate(["warm up"], SamplingParams(max_tokens=32, ignore_eos=True), use_tqdm=False)
    out = {}
    for p in points:
        n = p.get("requests", p["concurrency"] * 8)
        texts = loadgen.make_prompts(n, a.prompt_words, seed=1)
        prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                      tokenize=False), add_special_tokens=False) for t in texts]
        params = SamplingParams(temperature=0.6, top_p=0.95, max_tokens=p["max_tokens"], ignore_eos=True)
        eng = llm.engine
        t0 = time.monotonic()
        lo = t0 + p.get("warmup_s", 0.0)
        hi = lo + p["window_s"] if p["mode"] == "window" else float("inf")
        nxt, live, tokens, done, steps = 0, set(), 0, 0, 0
        while True:
            now = time.monotonic()
            if now >= hi:
                break
            while len(live) < p["concurrency"] and (p["mode"] == "window" or nxt < n):
                rid = f"d{nxt}"
                eng.add_request(rid, prompts[nxt % n], params)
                live.add(rid)
                nxt += 1
            if not live:
                break
            outs = eng.step()
            steps += 1
            now = time.monotonic()
            for o in outs:
                if lo <= now <= hi:
                    tokens += len(o.new_token_ids)
                if o.finished:
                    live.discard(o.request_id)
                    done += 1
        end = min(time.monotonic(), hi)
        for rid in live:
            eng.abort_request(rid)
        while eng.has_unfinished_requests():
            eng.step()
        out[p["name"]] = {"tokens": tokens, "span_s": end - lo, "tokens_per_s": tokens / (end - lo),
                          "requests_complete": done, "steps": steps, "mode": p["mode"]}
        log.info("direct %s: %.0f tok/s", p["name"], out[p["name"]]["tokens_per_s"])
    stats = llm.engine.stats()
    del llm
    return {"points": out, "engine_stats": stats}


def _vllm_env(a) -> dict:
    """The environment vLLM's server and its `vllm bench serve` client run in (its unpacked bundle alone)."""
    return dict(os.environ, PYTHONPATH=a.vllm_site, VLLM_USE_FLASHINFER_SAMPLER="0", VLLM_NO_USAGE_STATS="1",
                DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TVM_FFI_DISABLE_TORCH_C_DLPACK="1")


def run_vllm(a, model_dir: str, points: list[dict]) -> dict:
    port = _free_port()
    env = _vllm_env(a)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", "vllm-" + os.path.basename(model_dir), "--load-format", "dummy",
           "--dtype", "bfloat16", "--max-num-seqs", str(a.vllm_max_num_seqs), "--host", "127.0.0.1",
           "--port", str(port)]
    logf = open(os.path.join(a.out_dir, f"serve_compare_vllm_server_{a.tag}.log"), "w")
    t = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url, 600, proc)
        started = time.monotonic() - t
        _warm(url, "vllm")
        model = _model_name(url)
        res = {"start_s": started, "command": " ".join(cmd),
               "points": run_points(url, model, points, a.processes, a.prompt_words, a.slo)}
        if a.vllm_bench:
            res["vllm_bench"] = vllm_bench(a, env, url, model, model_dir, parse_point(a.vllm_bench))
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return res


def vllm_bench(a, env: dict, url: str, model: str, model_dir: str, p: dict) -> dict:
    """vLLM's own client (`vllm bench serve`, random prompts of about our prompts' length) at one point."""
    result_dir = os.path.join(a.out_dir, "vllm_bench_tmp")
    os.makedirs(result_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai-chat",
           "--base-url", url, "--endpoint", "/v1/chat/completions", "--model", model, "--tokenizer", model_dir,
           "--dataset-name", "random", "--random-input-len", "200", "--random-output-len", str(p["max_tokens"]),
           "--num-prompts", str(p.get("requests", p["concurrency"])), "--max-concurrency", str(p["concurrency"]),
           "--ignore-eos", "--temperature", "0.6", "--top-p", "0.95", "--save-result", "--result-dir", result_dir,
           "--result-filename", "bench.json", "--percentile-metrics", "ttft,tpot,itl,e2el"]
    t = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.vllm_bench_timeout_s)
    out = {"command": " ".join(cmd), "returncode": done.returncode, "wall_s": time.monotonic() - t,
           "stdout_tail": done.stdout[-3000:], "stderr_tail": done.stderr[-2000:]}
    path = os.path.join(result_dir, "bench.json")
    if os.path.isfile(path):
        with open(path) as f:
            r = json.load(f)
        out["result"] = {k: v for k, v in r.items() if not isinstance(v, list)}
    return out


def _warm(url: str, who: str) -> None:
    """One short request first: the first request of a server pays compilation and graph capture."""
    import asyncio

    import aiohttp

    from benchmarks.loadgen import chat_body, stream_one

    async def one():
        async with aiohttp.ClientSession() as s:
            return await stream_one(s, url, chat_body(_model_name(url), "warm up", 32), time.monotonic() + 600)

    rec = asyncio.run(one())
    log.info("%s warm-up: status %s, %d events", who, rec["status"], len(rec["events"]))


def _model_name(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
        return json.load(r)["data"][0]["id"]


def merge(paths: list[str], out: str) -> dict:
    merged: dict = {"benchmark": "serve_compare", "parts": [], "systems": {}}
    for p in paths:
        with open(p) as f:
            part = json.load(f)
        merged["parts"].append({k: part.get(k) for k in ("tag", "command", "commit", "device", "date")})
        for k in ("shape", "device", "prompt_words", "slo"):
            merged.setdefault(k, part.get(k))
        if part.get("headroom"):
            merged["headroom"] = part["headroom"]
        for name, r in part["systems"].items():  # a later part's point replaces an earlier one of the same name
            into = merged["systems"].setdefault(name, {"points": {}, "point_part": {}, "replaced_points": {}})
            into.update({k: v for k, v in r.items() if k != "points"})
            for pt in r["points"]:  # kept, not dropped: an earlier run of the same point (e.g. a cold start)
                if pt in into["points"]:
                    into["replaced_points"][f"{pt} ({into['point_part'][pt]})"] = into["points"][pt]
            into["points"].update(r["points"])
            into["point_part"].update({pt: part.get("tag") for pt in r["points"]})
        merged.setdefault("failed_systems", {}).update(part.get("failed_systems") or {})
    commits = sorted({pt["commit"] for pt in merged["parts"] if pt.get("commit")})
    merged["commit"] = commits[0] if len(commits) == 1 else commits  # each part's own is in `parts`
    merged["command"] = " ".join(sys.argv)
    _ratios(merged)
    write_result(out, merged, indent=1)
    plot(merged, out.removesuffix(".json") + ".png")
    return merged


def _ratios(res: dict) -> None:
    """zipserve over vLLM and HTTP over in-process, per point both sides measured."""
    sy = res["systems"]
    ratios = {}
    for name in ("zipserve", "zipserve-full", "zipserve-reserved"):
        for peer in ("vllm", "zipserve-direct"):
            if name in sy and peer in sy and (name == "zipserve" or peer == "vllm"):
                for point, r in sy[name]["points"].items():
                    other = sy[peer]["points"].get(point)
                    if other and other["tokens_per_s"]:
                        ratios[f"{name}/{peer} {point}"] = r["tokens_per_s"] / other["tokens_per_s"]
    best = max((r["tokens_per_s"] for s in sy.values() for r in s["points"].values()), default=0)
    if res.get("headroom") and best:
        ratios["client headroom (sustained / best real tokens/s)"] = res["headroom"]["sustained_tokens_per_s"] / best
    res["ratios"] = ratios


def plot(res: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("no matplotlib: %s not drawn (redraw with --merge)", path)
        return
    sy = res["systems"]
    points = sorted({p for s in sy.values() for p in s["points"]},
                    key=lambda p: (int(p.split(":")[0]), int(p.split(":")[1])))
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    width = 0.8 / max(1, len(sy))
    colors = {name: f"C{i}" for i, name in enumerate(sorted(sy))}  # one colour per system in every panel
    for k, (name, s) in enumerate(sorted(sy.items())):
        xs = [i + k * width for i, p in enumerate(points) if p in s["points"]]
        ys = [s["points"][p]["tokens_per_s"] for p in points if p in s["points"]]
        axes[0][0].bar(xs, ys, width, label=name, color=colors[name])
        for ax, key in ((axes[0][1], "ttft_s"), (axes[1][0], "itl_ms_per_token")):
            pts = [(i + k * width, s["points"][p][key]["p50"]) for i, p in enumerate(points)
                   if p in s["points"] and s["points"][p].get(key, {}).get("p50") is not None]
            if pts:
                ax.bar([x for x, _ in pts], [y for _, y in pts], width, label=name, color=colors[name])
        longest = max(int(p.split(":")[0]) for p in points)
        long = next((p for p in s["points"] if int(p.split(":")[0]) == longest and s["points"][p].get("timeline")), None)
        if long:
            tl = s["points"][long]["timeline"]
            axes[1][1].plot([t for t, _, _ in tl], [v for _, v, _ in tl], label=f"{name} {long}", color=colors[name])
    for ax, title in ((axes[0][0], "output tokens/s"), (axes[0][1], "TTFT p50 (s)"),
                      (axes[1][0], "inter-token latency p50 (ms per token)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(points))])
        ax.set_xticklabels([p.replace(":window", "\nwindow").replace(":requests", "\nrequests") for p in points],
                           fontsize=7)
        ax.set_title(title)
        ax.legend(fontsize=7)
    axes[1][1].set_title("tokens/s over time (longest point)")
    axes[1][1].set_xlabel("s")
    axes[1][1].legend(fontsize=7)
    fig.suptitle(f"HTTP streamed chat, {res.get('shape')} on {res.get('device')}: zipserve vs vLLM")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default="zipserve,vllm")
    p.add_argument("--points", default="2048:256:requests")
    p.add_argument("--shape", default="qwen3-8b")
    p.add_argument("--tokenizer-from", default=None, help="a model folder whose tokenizer and chat template to use")
    p.add_argument("--model", default=None, help="serve this model folder (its config; weights still dummy) "
                   "instead of --shape")
    p.add_argument("--config", default="configs/serve-gpu.yaml")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--processes", type=int, default=4, help="load generator processes")
    p.add_argument("--prompt-words", default="50,300")
    p.add_argument("--slo", default="2.0,100", help="goodput SLO: TTFT seconds, TPOT milliseconds")
    p.add_argument("--headroom", default=None, help="concurrency:interval_ms:seconds against the fixed-rate server")
    p.add_argument("--vllm-site", default="/tmp/vsite")
    p.add_argument("--vllm-max-num-seqs", type=int, default=256)
    p.add_argument("--vllm-bench", default=None, help="a point for `vllm bench serve` (requests mode), against "
                                                       "every system that serves HTTP")
    p.add_argument("--vllm-bench-timeout-s", type=float, default=300)
    p.add_argument("--replicas", type=int, default=1, help="zipserve worker replicas sharing the GPU")
    p.add_argument("--kv-gb", type=float, default=40.0, help="KV pool per replica when --replicas > 1")
    p.add_argument("--kill-after-s", type=float, default=None,
                   help="kill the busiest worker replica this long after the load starts (zipserve systems)")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--tag", default="part")
    p.add_argument("--merge", nargs="+", default=None, help="part JSON files to join (with --out)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.merge:
        res = merge(a.merge, a.out)
        print(json.dumps(res["ratios"], indent=1))
        return 0
    a.prompt_words = tuple(map(int, a.prompt_words.split(",")))
    a.slo = tuple(map(float, a.slo.split(",")))
    os.makedirs(a.out_dir, exist_ok=True)
    points = [parse_point(s) for s in a.points.split(",") if s]
    res = {"benchmark": "serve_compare", "tag": a.tag, "command": " ".join(sys.argv), "shape": a.shape,
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "prompt_words": a.prompt_words, "slo": a.slo,
           "commit": commit(), "systems": {}}
    try:
        import torch

        res["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        res["device"] = "cpu"
    stem = os.path.join(a.out_dir, f"serve_compare_{a.tag}")
    if a.headroom:
        from benchmarks.sse_server import headroom

        c, interval, secs = a.headroom.split(":")
        res["headroom"] = headroom(_free_port(), int(c), float(interval), float(secs), server_processes=a.processes,
                                   client_processes=a.processes)
        log.info("client headroom: %s", res["headroom"])
        _save(res, stem)
    model_dir = None
    for system in [s for s in a.systems.split(",") if s]:
        if model_dir is None and a.model:
            model_dir = a.model
        if model_dir is None:
            from benchmarks.decode_step import config_folder

            model_dir = config_folder(a.shape, tokenizer_from=a.tokenizer_from)
        log.info("=== %s ===", system)
        base, _, ray_mode = system.partition("@")
        try:
            if base in _ZIPSERVE_ENGINES:
                res["systems"][system] = run_zipserve(a, model_dir, points, _ZIPSERVE_ENGINES[base],
                                                      throughput_optimized=ray_mode != "default")
            elif system == "zipserve-direct":
                res["systems"][system] = run_direct(a, model_dir, points)
            elif system == "vllm":
                res["systems"][system] = run_vllm(a, model_dir, points)
            else:
                raise ValueError(f"unknown system {system!r}")
        except Exception as e:  # noqa: BLE001 -- one system failing must not cost the others' figures
            log.exception("system %s failed", system)
            res.setdefault("failed_systems", {})[system] = repr(e)
            _shutdown_ray()
        _save(res, stem)
    _ratios(res)
    _save(res, stem)
    plot(res, stem + ".png")
    print(json.dumps(res.get("ratios"), indent=1))
    return 0


def _shutdown_ray() -> None:
    try:
        import ray
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    except Exception:  # noqa: BLE001 -- best effort before the next system
        log.exception("ray shutdown failed")


def _save(res: dict, stem: str) -> None:
    write_result(stem + ".json", res, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
