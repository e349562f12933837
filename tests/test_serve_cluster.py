"""The app on a 2-node Ray cluster (ray.cluster_utils), and `serve run configs/serve.yaml` as users run it."""

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest

pytest.importorskip("ray")
from ray import serve  # noqa: E402

from zipserve.cluster.app import build_app  # noqa: E402
from tests.waiting import wait_until  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE = {"block_size": 16, "num_blocks": 200, "max_model_len": 256, "max_num_seqs": 16, "budget_blocks": 4,
          "compression": {"query_window": 8}}


def test_two_node_cluster_replicas_on_both_nodes_router_spreads(qwen3_path, local_ray):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        with local_ray(address=cluster.address, serve=True) as port:
            # One CPU per worker replica and one CPU per node: the two replicas must land on different nodes.
            serve.run(build_app({"model": qwen3_path, "model_name": "tiny", "engine": ENGINE,
                                 "workers": {"num_replicas": 2, "num_cpus": 1}}), name="zipserve", route_prefix="/")
            with httpx.Client(timeout=120) as c:
                for i in range(16):
                    r = c.post(f"http://127.0.0.1:{port}/v1/completions",
                               json={"model": "tiny", "prompt": [5 + i] * (20 + 10 * i), "max_tokens": 24,
                                     "temperature": 0, "ignore_eos": True})
                    assert r.status_code == 200, r.text
            handle = serve.get_deployment_handle("EngineWorker", app_name="zipserve")
            seen = {}

            def both_replicas_answered():
                s = handle.stats.remote().result(timeout_s=30)
                seen[s["replica"]] = s
                return len(seen) == 2

            wait_until(both_replicas_answered, timeout=60, interval=0, message=lambda: f"stats of 2 replicas: {seen}")
            assert len({s["node"] for s in seen.values()}) == 2, "replicas must be on both nodes"
            tokens = [s["generated_tokens"] for s in seen.values()]
            assert sum(tokens) == 16 * 24 and min(tokens) > 0, tokens
    finally:
        cluster.shutdown()


def test_serve_run_configs_serve_yaml_comes_up(qwen3_path, tmp_path):
    """`serve run configs/serve.yaml`, unchanged, in a subprocess (the model comes from $ZIPSERVE_MODEL)."""
    env = dict(os.environ, ZIPSERVE_MODEL=qwen3_path, RAY_AUTH_MODE="disabled")
    serve_bin = os.path.join(os.path.dirname(sys.executable), "serve")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([serve_bin, "run", "configs/serve.yaml"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def models():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            r = httpx.get("http://127.0.0.1:8000/v1/models", timeout=5)
            return r.status_code == 200 and r

        r = wait_until(models, timeout=240, interval=1, retry_on=(httpx.HTTPError,),
                       message=lambda: "the app's /v1/models; log: " + (tmp_path / "serve.log").read_text()[-3000:])
        name = r.json()["data"][0]["id"]
        r = httpx.post("http://127.0.0.1:8000/v1/completions",
                       json={"model": name, "prompt": "hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True},
                       timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8, r.text
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_workers_autoscale_on_page_pressure(qwen3_path, local_ray):
    """min 1 / max 2 replicas, a pool of 24 pages: long requests fill the pages, the policy (fed by the
    workers' record_autoscaling_stats) asks for a second replica; when idle it goes back to one."""
    with local_ray(num_cpus=2, serve=True) as port:
        engine = dict(ENGINE, num_blocks=24, max_num_seqs=4, budget_blocks=4)
        serve.run(build_app({"model": qwen3_path, "model_name": "tiny", "engine": engine,
                             "workers": {"num_cpus": 0, "autoscaling": {
                                 "min_replicas": 1, "max_replicas": 2, "target_pressure": 0.5,
                                 "upscale_delay_s": 1, "downscale_delay_s": 3, "metrics_interval_s": 0.5,
                                 "look_back_period_s": 2}}}), name="zipserve", route_prefix="/")

        def replicas() -> int:
            status = serve.status().applications["zipserve"].deployments["EngineWorker"]
            return status.replica_states.get("RUNNING", 0)

        import threading

        stop = threading.Event()

        def load():
            with httpx.Client(timeout=120) as c:
                while not stop.is_set():
                    c.post(f"http://127.0.0.1:{port}/v1/completions",
                           json={"model": "tiny", "prompt": [9] * 60, "max_tokens": 150, "temperature": 0,
                                 "ignore_eos": True})

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: replicas() >= 2, timeout=90, interval=1, message="a scale-up under page pressure")
        finally:
            stop.set()
            for t in threads:
                t.join()
        wait_until(lambda: replicas() <= 1, timeout=120, interval=1, message="a scale-down to 1 replica when idle")


def test_node_removed_under_load_loses_no_stream(qwen3_path, local_ray):
    """A worker node leaves the cluster (ray.cluster_utils remove_node) while 40 streams run on both
    worker nodes: every stream completes, equal to the healthy greedy output."""
    from ray.cluster_utils import Cluster

    from tests.test_reliability import ENGINE as FULL_KV, _all_complete, _expected, _prompts, _streams_with_disruption

    # The proxy and the ingress stay on the head (as in configs/cluster.yaml); a worker node leaves.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "resources": {"head": 1}})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    try:
        with local_ray(address=cluster.address, serve=True, proxy_location="HeadOnly") as port:
            url = f"http://127.0.0.1:{port}"
            serve.run(build_app({"model": qwen3_path, "model_name": "tiny", "engine": FULL_KV,
                                 "workers": {"num_replicas": 2, "num_cpus": 1},
                                 "ingress": {"resources": {"head": 0.01}}}), name="zipserve", route_prefix="/")
            prompts = _prompts(40, seed=5)
            # Streams of 160 tokens: long enough that the node is gone while its replica still streams (with
            # 64, a fast machine could finish them all before remove_node took effect, and nothing migrated).
            want = _expected(qwen3_path, prompts, max_tokens=160)
            results, _ = _streams_with_disruption(url, prompts, 150, lambda: cluster.remove_node(workers[0]),
                                                  max_tokens=160)
            bad = _all_complete(results)
            assert not bad, bad[:3]
            assert [r[1] for r in results] == want
            assert httpx.get(url + "/health").json()["migrated_samples"] >= 1
    finally:
        cluster.shutdown()
