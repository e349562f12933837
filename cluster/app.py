"""Build the zipserve Serve application from one config mapping (the `args:` of configs/serve.yaml).

    ingress (OpenAIIngress, FastAPI)  --handle, CapacityAffinityRouter-->  workers (EngineWorker x N)

The mapping is an `AppConfig`: its sections and their keys are the models below, unknown keys refused.
`engine` holds EngineConfig keys (workers/config.py), over the preset named by `engine_config`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, create_model, field_validator, model_validator
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig

from zipserve.cluster.reasoning import PARSERS
from zipserve.workers.config_model import ConfigModel

if TYPE_CHECKING:
    from zipserve.workers.config import EngineConfig

log = logging.getLogger("zipserve.app")

POLICY_FUNCTION = "zipserve.cluster.autoscaling:PagePressurePolicy"


class _PagePressureKnobs(ConfigModel):
    """workers.autoscaling: Ray's AutoscalingConfig keys (min_replicas, max_replicas, upscale_delay_s,
    downscale_delay_s, ...; added below) and the page-pressure policy's own (cluster/autoscaling.py)."""

    key_kind: ClassVar[str] = "workers.autoscaling key"

    target_pressure: float | None = Field(None, gt=0, le=1)  # mean max(page use, slot use) the policy aims for
    queue_per_replica: float | None = Field(None, ge=0)  # more waiting requests per replica than this adds one

    def ray_config(self) -> dict:
        """The deployment's autoscaling_config: the Ray keys given, our defaults, the page-pressure policy."""
        given = self.model_dump(exclude_unset=True)
        policy_kwargs = {k: given.pop(k) for k in _PagePressureKnobs.model_fields if k in given}
        given.setdefault("min_replicas", 1)
        given.setdefault("max_replicas", max(given["min_replicas"], 1))
        given.setdefault("metrics_interval_s", 1.0)
        given.setdefault("look_back_period_s", 10.0)
        return dict(given, policy={"policy_function": POLICY_FUNCTION, "policy_kwargs": policy_kwargs})

    @model_validator(mode="after")
    def _ray_accepts(self):
        """Ray's own checks (types, min <= max replicas) now, on the driver, rather than at deployment."""
        AutoscalingConfig(**self.ray_config())
        return self


# Ray's keys are checked by Ray (_ray_accepts); `policy` is ours to set.
AutoscalingSection = create_model(
    "AutoscalingSection", __base__=_PagePressureKnobs,
    **{name: (Any, None) for name in AutoscalingConfig.model_fields if name != "policy"})


class WorkersConfig(ConfigModel):
    key_kind: ClassVar[str] = "workers key"

    num_replicas: int = Field(1, ge=1)  # a fixed size (unless autoscaling is given)
    autoscaling: AutoscalingSection | None = None  # autoscale on page pressure and queue length
    num_gpus: float = Field(0, ge=0)  # per replica (a tensor-parallel engine takes its tensor_parallel_size)
    num_cpus: float = Field(1, ge=0)
    max_ongoing_requests: int = Field(1024, ge=1)
    max_queued_requests: int = Field(-1, ge=-1)  # beyond: 503 with Retry-After (-1: no limit)
    stall_timeout_s: float = Field(120.0, gt=0)  # no engine progress this long with work pending: unhealthy
    # The ingress's per-request events a second a worker aims at: its multiplexed stream flushes every
    # (open streams / this) seconds, at most every max_stream_interval_s.
    stream_events_per_s: float = Field(4000.0, gt=0)
    max_stream_interval_s: float = Field(0.2, gt=0)
    stream_interval_s: float = Field(0.05, ge=0)  # direct handle streams: sent at most this often
    engine_process: bool = True  # the step loop in its own process

    @field_validator("autoscaling", mode="before")
    @classmethod
    def _empty_is_off(cls, v):
        return v or None


class RoutingConfig(ConfigModel):
    """The router's policy knobs (scheduler/router.py; None: its defaults) and how often workers report."""

    key_kind: ClassVar[str] = "routing key"

    prefill_tokens_per_s: float | None = Field(None, gt=0)
    mean_service_s: float | None = Field(None, gt=0)
    balance_s: float | None = Field(None, ge=0)
    stats_period_s: float = Field(0.1, gt=0)  # workers report pages, slots, queue and cached page hashes

    def router_kwargs(self) -> dict:
        return self.model_dump(exclude_none=True, exclude={"stats_period_s"})


class IngressConfig(ConfigModel):
    key_kind: ClassVar[str] = "ingress key"

    num_replicas: int = Field(1, ge=1)
    max_concurrent_requests: int = Field(256, ge=1)  # beyond: 429 with Retry-After, before any work starts
    retry_after_s: int = Field(1, ge=0)  # the Retry-After header (whole seconds)
    num_cpus: float = Field(0, ge=0)
    resources: dict[str, float] = {}  # custom Ray resources, e.g. to keep the ingress on the head node
    request_timeout_s: float = Field(600.0, gt=0)  # per-request deadline
    max_migrations: int = Field(3, ge=0)  # moves of a request's samples after worker deaths
    max_prompt_tokens: int | None = Field(None, ge=1)
    max_tokens_limit: int | None = Field(None, ge=1)
    # <think> ... </think> goes to reasoning_content in chat answers and deltas (cluster/reasoning.py)
    reasoning_parser: Literal[PARSERS] | None = None


class AppConfig(ConfigModel):
    key_kind: ClassVar[str] = "app config key"

    model: str | None = None  # model folder; None = $ZIPSERVE_MODEL, else the embedded SmolLM2-135M-Instruct
    model_name: str | None = None  # the name clients send as `model` (default: the folder's name)
    engine_config: str | None = None  # an engine preset YAML (configs/engine/*.yaml); `engine` keys override it
    engine: dict[str, Any] = {}  # EngineConfig keys, checked against the model folder by load_app_config
    workers: WorkersConfig = WorkersConfig()
    routing: RoutingConfig = RoutingConfig()
    ingress: IngressConfig = IngressConfig()

    @field_validator("engine", "workers", "routing", "ingress", mode="before")
    @classmethod
    def _empty_section(cls, v):
        return {} if v is None else v


def load_app_config(args: dict | None) -> tuple[AppConfig, EngineConfig]:
    """The app config validated, its model resolved, and its engine's config (validated now, on the
    driver: a typo fails the deploy with a clear message)."""
    from zipserve.workers.config import EngineConfig

    app = AppConfig.model_validate(args or {})
    model = app.model or os.environ.get("ZIPSERVE_MODEL")
    if not model:
        from zipserve.cluster.default_model import ensure_default_model

        model = ensure_default_model()  # engine defaults: torch/fp32 on CPU, triton/bf16 on CUDA
    app = app.model_copy(update={"model": model})
    engine = (EngineConfig.from_yaml(app.engine_config, model=model, **app.engine) if app.engine_config
              else EngineConfig.from_kwargs(model, **app.engine))
    return app, engine


def resolve_config(args: dict | None) -> dict:
    """`load_app_config` as a mapping: the keys given (sections included; defaults not filled in), the
    resolved model, and the engine's block_size."""
    app, engine = load_app_config(args)
    out = app.model_dump(exclude_unset=True, exclude={"workers", "routing", "ingress"})
    for section in ("workers", "routing", "ingress"):
        out[section] = getattr(app, section).model_dump(exclude_unset=True)
    return dict(out, model=app.model, engine=dict(app.engine), block_size=engine.block_size)


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

    app, engine = load_app_config(args)
    w, ing = app.workers, app.ingress
    engine_config = dict(app.engine, model=app.model)
    if app.engine_config:
        engine_config["config_file"] = app.engine_config
    router = RequestRouterConfig(
        request_router_class=CapacityAffinityRouter, request_router_kwargs=app.routing.router_kwargs(),
        request_routing_stats_period_s=app.routing.stats_period_s, request_routing_stats_timeout_s=5)
    options = dict(
        name="EngineWorker", request_router_config=router,
        ray_actor_options={"num_gpus": gpus_per_engine(w.num_gpus, engine.to_dict()), "num_cpus": w.num_cpus},
        max_ongoing_requests=w.max_ongoing_requests, max_queued_requests=w.max_queued_requests,
        health_check_period_s=10, health_check_timeout_s=30, graceful_shutdown_timeout_s=60)
    if w.autoscaling is not None:
        options["autoscaling_config"] = w.autoscaling.ray_config()
    else:
        options["num_replicas"] = w.num_replicas
    worker = serve.deployment(EngineWorker).options(**options).bind(
        engine_config, w.stall_timeout_s, w.stream_interval_s, w.engine_process, w.stream_events_per_s,
        w.max_stream_interval_s)
    ingress = serve.deployment(OpenAIIngress).options(
        name="OpenAIIngress", num_replicas=ing.num_replicas,
        ray_actor_options={"num_cpus": ing.num_cpus, "resources": dict(ing.resources)}, max_ongoing_requests=100_000)
    return ingress.bind(worker, app.model, app.model_name, engine.block_size, ing.max_concurrent_requests,
                        ing.retry_after_s, ing.request_timeout_s, ing.max_migrations, ing.max_prompt_tokens,
                        ing.max_tokens_limit, ing.reasoning_parser)
