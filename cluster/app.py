"""Build the zipserve Serve application from one config mapping (the `args:` of configs/serve.yaml).

    ingress (OpenAIIngress, FastAPI)  --handle, CapacityAffinityRouter-->  workers (EngineWorker x N)

Keys (unknown keys are refused):
  model            model folder; None = $ZIPSERVE_MODEL, else the embedded SmolLM2-135M-Instruct
                   (converted once, cached)
  model_name       the name clients send as `model` (default: the folder's name)
  engine_config    an engine preset YAML (configs/engine/*.yaml); `engine` keys override it
  engine           EngineConfig keys (block_size, budget_blocks, backend, max_num_seqs, ...)
  workers          num_replicas | autoscaling {min_replicas, max_replicas, target_pressure,
                   queue_per_replica, upscale_delay_s, downscale_delay_s, ...}; num_gpus, num_cpus,
                   max_ongoing_requests, max_queued_requests, stall_timeout_s,
                   stream_events_per_s (the ingress's per-request events a second a worker aims at:
                   its multiplexed stream flushes every open streams / this, default 4000),
                   max_stream_interval_s (the flush interval's cap, default 0.2),
                   stream_interval_s (direct handle streams: sent at most this often; default 0.05),
                   engine_process (the step loop in its own process; default true)
  routing          prefill_tokens_per_s, mean_service_s, balance_s, stats_period_s
  ingress          num_replicas, max_concurrent_requests, retry_after_s, num_cpus, resources (custom Ray
                   resources, e.g. to keep the ingress on the head node beside the proxy), request_timeout_s
                   (per-request deadline), max_migrations (moves after worker deaths), max_prompt_tokens,
                   max_tokens_limit, reasoning_parser (qwen3 | deepseek_r1: <think> ... </think> goes to
                   reasoning_content in chat answers and deltas)
"""

from __future__ import annotations

import logging
import os
import time

from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig

log = logging.getLogger("zipserve.app")

_KEYS = {"model", "model_name", "engine_config", "engine", "workers", "routing", "ingress"}
_WORKER_KEYS = {"num_replicas", "autoscaling", "num_gpus", "num_cpus", "max_ongoing_requests",
                "max_queued_requests", "stall_timeout_s", "stream_interval_s", "engine_process",
                "stream_events_per_s", "max_stream_interval_s"}
_ROUTING_KEYS = {"prefill_tokens_per_s", "mean_service_s", "balance_s", "stats_period_s"}
_INGRESS_KEYS = {"num_replicas", "max_concurrent_requests", "retry_after_s", "num_cpus", "resources", "request_timeout_s",
                 "max_migrations", "max_prompt_tokens", "max_tokens_limit", "reasoning_parser"}
_POLICY_KEYS = {"target_pressure", "queue_per_replica"}


def _check(section: str, given: dict, known: set) -> dict:
    if not isinstance(given, dict):
        raise ValueError(f"{section} must be a mapping")
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown {section} key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return given


def resolve_config(args: dict | None) -> dict:
    """Validate the app config and fill defaults (the embedded model when none is given)."""
    args = dict(_check("app config", args or {}, _KEYS))
    if not args.get("model") and os.environ.get("ZIPSERVE_MODEL"):
        args["model"] = os.environ["ZIPSERVE_MODEL"]
    if not args.get("model"):
        from zipserve.cluster.default_model import ensure_default_model

        args["model"] = ensure_default_model()  # engine defaults: torch/fp32 on CPU, triton/bf16 on CUDA
    for key, known in (("workers", _WORKER_KEYS), ("routing", _ROUTING_KEYS), ("ingress", _INGRESS_KEYS)):
        args[key] = dict(_check(key, args.get(key) or {}, known))
    _check("workers.autoscaling", args["workers"].get("autoscaling") or {},
           _POLICY_KEYS | set(AutoscalingConfig.model_fields))
    if args["ingress"].get("reasoning_parser") is not None:
        from zipserve.cluster.reasoning import ReasoningParser

        ReasoningParser(args["ingress"]["reasoning_parser"])  # an unknown family fails the deploy here
    args["engine"] = dict(args.get("engine") or {})
    # Validate the engine config now, on the driver: a typo fails the deploy with a clear message.
    from zipserve.workers.config import EngineConfig

    eng = dict(args["engine"])
    cfg = (EngineConfig.from_yaml(args["engine_config"], model=args["model"], **eng) if args.get("engine_config")
           else EngineConfig.from_kwargs(args["model"], **eng))
    args["block_size"] = cfg.block_size
    return args


DIRECT_PORT_SPARE = 4  # ports a restarted ingress replica can take while its old one is quarantined


def throughput_env(http_port: int, ingress_replicas: int = 1) -> dict[str, str]:
    """Environment for Ray Serve's throughput-optimized mode (Ray >= 2.55): gRPC between deployments and
    direct ingress, where each ingress replica serves HTTP itself (the first on a node at http_port + 1,
    see `ingress_urls`), skipping the proxy's extra hop per streamed chunk; the proxy keeps answering on
    http_port. Every Ray process reads these when it starts: put them in the environment of `ray.init` /
    `ray start` (cluster/cli.py does, for `zipserve serve --throughput-optimized`)."""
    end = http_port + 1 + max(1, int(ingress_replicas)) + DIRECT_PORT_SPARE  # exclusive
    return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http_port + 1),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(end),
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(http_port + 1001),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(end + 1000)}


def ingress_urls(app_name: str = "zipserve", host: str | None = None, timeout_s: float = 60.0) -> list[str]:
    """The HTTP addresses that serve `app_name`: its ingress replicas' own ports under direct ingress, else
    the proxies'. Read from Serve's controller (its target groups; a private call, no public API has them).
    host: the address Serve binds (http_options.host); a loopback one replaces the node's IP."""
    import ray
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    deadline = time.monotonic() + timeout_s
    while True:
        groups = ray.get(controller.get_target_groups.remote(app_name))
        local = host if host and host not in ("0.0.0.0", "::") else None
        urls = [f"http://{local or t.ip}:{t.port}" for g in groups if str(g.protocol).endswith("HTTP")
                for t in g.targets]
        if urls or time.monotonic() > deadline:
            return urls
        time.sleep(0.5)


def gpus_per_engine(num_gpus: float, engine: dict) -> float:
    """GPUs for one engine actor: a tensor-parallel engine is one actor holding all its ranks' GPUs (so they
    are on one node, visible to the rank processes it starts)."""
    tp = int(engine.get("tensor_parallel_size", 1))
    if tp > 1 and 0 < num_gpus < tp:
        log.info("engine.tensor_parallel_size %d: each engine actor takes %d GPUs", tp, tp)
        return tp
    return num_gpus


def build_app(args: dict | None = None):
    """Application builder: `serve run zipserve.cluster.app:build_app` or an import_path in configs/serve.yaml."""
    from zipserve.cluster.ingress import OpenAIIngress
    from zipserve.scheduler.router import CapacityAffinityRouter
    from zipserve.cluster.worker import EngineWorker

    cfg = resolve_config(args)
    w, r, ing = cfg["workers"], cfg["routing"], cfg["ingress"]
    engine_config = dict(cfg["engine"], model=cfg["model"])
    if cfg.get("engine_config"):
        engine_config["config_file"] = cfg["engine_config"]
    router = RequestRouterConfig(
        request_router_class=CapacityAffinityRouter,
        request_router_kwargs={k: r[k] for k in ("prefill_tokens_per_s", "mean_service_s", "balance_s") if k in r},
        request_routing_stats_period_s=r.get("stats_period_s", 0.1), request_routing_stats_timeout_s=5)
    gpus = gpus_per_engine(w.get("num_gpus", 0), cfg["engine"])
    options = dict(
        name="EngineWorker", request_router_config=router,
        ray_actor_options={"num_gpus": gpus, "num_cpus": w.get("num_cpus", 1)},
        max_ongoing_requests=w.get("max_ongoing_requests", 1024),
        max_queued_requests=w.get("max_queued_requests", -1), health_check_period_s=10,
        health_check_timeout_s=30, graceful_shutdown_timeout_s=60)
    if w.get("autoscaling"):
        auto = dict(w["autoscaling"])
        kwargs = {k: auto.pop(k) for k in list(auto) if k in _POLICY_KEYS}
        auto.setdefault("min_replicas", 1)
        auto.setdefault("max_replicas", max(auto["min_replicas"], 1))
        auto["policy"] = {"policy_function": "zipserve.cluster.autoscaling:PagePressurePolicy", "policy_kwargs": kwargs}
        auto.setdefault("metrics_interval_s", 1.0)
        auto.setdefault("look_back_period_s", 10.0)
        options["autoscaling_config"] = auto
    else:
        options["num_replicas"] = w.get("num_replicas", 1)
    worker = serve.deployment(EngineWorker).options(**options).bind(
        engine_config, w.get("stall_timeout_s", 120.0), w.get("stream_interval_s", 0.05), w.get("engine_process", True),
        w.get("stream_events_per_s", 4000.0), w.get("max_stream_interval_s", 0.2))
    ingress = serve.deployment(OpenAIIngress).options(
        name="OpenAIIngress", num_replicas=ing.get("num_replicas", 1),
        ray_actor_options={"num_cpus": ing.get("num_cpus", 0), "resources": dict(ing.get("resources") or {})},
        max_ongoing_requests=100_000)
    return ingress.bind(worker, cfg["model"], cfg.get("model_name"), cfg["block_size"],
                        ing.get("max_concurrent_requests", 256), ing.get("retry_after_s", 1),
                        ing.get("request_timeout_s", 600.0), ing.get("max_migrations", 3),
                        ing.get("max_prompt_tokens"), ing.get("max_tokens_limit"), ing.get("reasoning_parser"))
