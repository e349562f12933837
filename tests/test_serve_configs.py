"""Configs and the pieces of the serving app that need no running server: configs/*.yaml against Ray's own
schemas, the app config's validation, the autoscaling policy, the CLI."""

import json
import os
from types import SimpleNamespace

import pytest
import yaml

ray = pytest.importorskip("ray")

from zipserve.cluster.app import resolve_config  # noqa: E402
from zipserve.cluster.autoscaling import PagePressurePolicy  # noqa: E402
from zipserve.cluster.cli import build_parser, load_app_args  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ray_cluster_schema() -> dict:
    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-aws.yaml"])
def test_cluster_configs_validate_against_rays_schema(name):
    jsonschema = pytest.importorskip("jsonschema")
    schema = _ray_cluster_schema()
    with open(os.path.join(ROOT, "configs", name)) as f:
        cfg = yaml.safe_load(f)
    jsonschema.validate(cfg, schema)
    # The check has teeth: a misspelled key or a wrong type is refused.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dict(cfg, max_worker=3), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dict(cfg, max_workers="two"), schema)


@pytest.mark.parametrize("name,block_size,max_replicas", [("serve.yaml", 16, 2), ("serve-gpu.yaml", 256, 8)])
def test_serve_yamls_are_valid_serve_configs_and_app_configs(name, block_size, max_replicas, qwen3_path):
    from ray.serve.schema import ServeDeploySchema

    with open(os.path.join(ROOT, "configs", name)) as f:
        data = yaml.safe_load(f)
    ServeDeploySchema.model_validate(data)
    args = load_app_args(os.path.join(ROOT, "configs", name))
    assert data["applications"][0]["import_path"] == "zipserve.cluster.app:build_app"
    if args.get("engine_config"):
        args["engine_config"] = os.path.join(ROOT, args["engine_config"])
    cfg = resolve_config(dict(args, model=qwen3_path, engine=dict(args["engine"], backend="torch")))
    assert cfg["block_size"] == block_size and cfg["workers"]["autoscaling"]["max_replicas"] == max_replicas


@pytest.mark.parametrize("preset", sorted(os.listdir(os.path.join(ROOT, "configs", "engine"))))
def test_engine_presets_load(preset, qwen3_path):
    from zipserve.workers.config import EngineConfig

    cfg = EngineConfig.from_yaml(os.path.join(ROOT, "configs", "engine", preset), model=qwen3_path)
    assert cfg.block_size >= 1


@pytest.mark.parametrize("bad, needle", [
    ({"wokers": {}}, "unknown app config key"),
    ({"workers": {"replicas": 2}}, "unknown workers key"),
    ({"workers": {"autoscaling": {"max_replica": 2}}}, "unknown workers.autoscaling key"),
    ({"ingress": {"max_concurrent": 2}}, "unknown ingress key"),
    ({"engine": {"block_sise": 16}}, "unknown engine config key"),
])
def test_app_config_rejects_unknown_keys(bad, needle, qwen3_path):
    with pytest.raises(ValueError, match=needle):
        resolve_config(dict(bad, model=qwen3_path))


def _ctx(n, pages=None, slots=None, waiting=None, total=0):
    return SimpleNamespace(current_num_replicas=n, total_num_requests=total,
                           aggregated_metrics={"page_pressure": pages or {}, "slot_pressure": slots or {},
                                               "waiting": waiting or {}})


def test_autoscaling_policy_follows_page_pressure_and_queue():
    p = PagePressurePolicy(target_pressure=0.5, queue_per_replica=4)
    # Two replicas at 90% of their pages: 2 * 0.9 / 0.5 -> 4 replicas.
    assert p(_ctx(2, pages={"a": 0.9, "b": 0.9}))[0] == 4
    # Slots can be the tighter resource.
    assert p(_ctx(2, pages={"a": 0.1, "b": 0.1}, slots={"a": 1.0, "b": 1.0}))[0] == 4
    # Idle replicas shrink, but not while requests wait.
    assert p(_ctx(4, pages={k: 0.05 for k in "abcd"}))[0] == 1
    assert p(_ctx(4, pages={k: 0.05 for k in "abcd"}, waiting={"a": 1.0}))[0] == 4
    # A deep queue adds a replica even with free pages (prompts waiting for prefill).
    assert p(_ctx(2, pages={"a": 0.2, "b": 0.2}, waiting={"a": 10.0, "b": 5.0}))[0] == 3
    # Cold start: no reports yet, but requests queued at the handle -> one replica.
    assert p(_ctx(0, total=3))[0] == 1 and p(_ctx(0))[0] == 0
    with pytest.raises(ValueError):
        PagePressurePolicy(target_pressure=0)


def test_cli_serve_arguments():
    args = build_parser().parse_args(["serve", "--config", "configs/serve.yaml", "--port", "9000", "--replicas", "2"])
    assert args.command == "serve" and args.port == 9000 and args.replicas == 2 and args.host == "127.0.0.1"


def test_fixed_replicas_replace_the_configs_autoscaling(qwen3_path):
    from zipserve.cluster.app import build_app
    from zipserve.cluster.cli import set_fixed_replicas

    args = load_app_args(os.path.join(ROOT, "configs", "serve.yaml"))
    set_fixed_replicas(args, 3)
    app = build_app(dict(args, model=qwen3_path, engine=dict(args["engine"], backend="torch")))
    worker = app._bound_deployment.init_args[0]._bound_deployment  # the ingress's first argument: the workers
    assert worker.num_replicas == 3 and worker._deployment_config.autoscaling_config is None


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-aws.yaml"])
def test_cluster_configs_start_ray_in_throughput_optimized_serve(name):
    """Every node's `ray start` carries the environment `zipserve serve` sets for port 8000 (cluster/app.py
    throughput_env): Ray processes read it only when they start."""
    from zipserve.cluster.app import throughput_env

    with open(os.path.join(ROOT, "configs", name)) as f:
        cfg = yaml.safe_load(f)
    want = throughput_env(8000)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cfg[key] if "ray start" in c)
        env = dict(w.split("=", 1) for w in start.split("ray start")[0].split())
        assert env == want, (key, env)
