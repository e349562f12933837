import contextlib
import os

# One intra-op thread, here and in every process the tests start (engine processes, Ray's workers and
# subprocesses inherit the environment; torch reads it when imported): the models are tiny, and on a loaded
# 2-core machine two spinning OpenMP threads per process made an engine process 5-20x slower (200 tokens in
# 5-10 s instead of 0.3-5 s), stretching every timeout-bound test.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# Without a GPU, Triton kernels run in the interpreter; it must be on before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Serve's controller gives a starting proxy 5 s to answer its readiness check, then kills and replaces it, and
# serve.start fails on the killed one: on a loaded 2-core machine a proxy takes longer. (Set here, not per
# Ray: every Ray the tests start reads it, ray.cluster_utils clusters and `serve run` subprocesses included.)
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
# Ray runs its workers at niceness 15 (its default, RAY_worker_niceness): the server under test (Serve's
# controller, proxy and replicas) then gets a few percent of a CPU against any busy process of normal priority
# -- under two CPU burners serve.start took 71 s instead of 2.5 s (5.6 s at niceness 0).
os.environ.setdefault("RAY_worker_niceness", "0")

import pytest  # noqa: E402

from tests.serving import free_port  # noqa: E402

torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """Build (once per session) a tiny model folder for a given set of options."""
    from zipserve.workers.models.random_folder import build_model_folder  # the models and transformers, on use

    cache = {}

    def make(arch="qwen3", **kw):
        key = (arch, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in cache:
            path = str(tmp_path_factory.mktemp(f"{arch}-model"))
            cache[key] = build_model_folder(path, arch, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def qwen3_path(model_factory):
    return model_factory("qwen3")


@contextlib.contextmanager
def _ray_for_the_block(*, num_cpus: int | None = 2, address: str = "local", serve: bool = False,
                       throughput_optimized: bool = False, proxy_location: str | None = None):
    """A fresh Ray for the block, and Serve on a free port when `serve`; yields that port (None without Serve).

    address: "local" starts a one-node Ray with `num_cpus`; a cluster's address (ray.cluster_utils) joins it
    as it is. throughput_optimized: Serve's throughput mode as `zipserve serve` runs it (cluster/app.py
    throughput_env); its environment is set before Ray starts (every Ray process reads it then) and
    restored after shutdown."""
    import ray

    if throughput_optimized and not serve:
        raise ValueError("throughput_optimized is a Serve mode: pass serve=True")
    if ray.is_initialized():  # left by code that starts Ray itself: the block gets the resources it asks for
        ray.shutdown()
    port = free_port() if serve else None
    env = {}
    if throughput_optimized:
        from zipserve.cluster.app import throughput_env

        # No load balancer drains the ingress here: do not hold each shutdown for its 30 s draining period.
        env = throughput_env(port) | {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0.5"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        if address == "local":
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
        if serve:
            from ray import serve as ray_serve

            where = {} if proxy_location is None else {"proxy_location": proxy_location}
            ray_serve.start(http_options={"host": "127.0.0.1", "port": port}, **where)
        yield port
    finally:
        if serve and ray.is_initialized():
            from ray import serve as ray_serve

            ray_serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def local_ray():
    """Start Ray (and Serve) for a `with` block: `with local_ray(num_cpus=3, serve=True) as port: ...`.

    A factory, not one Ray for the session: modules need different CPU counts, Serve modes (whose environment
    Ray reads at start) or a multi-node cluster, and each gets a fresh Ray, shut down when its block ends.
    Module fixtures and single tests use the same factory; see _ray_for_the_block for the options."""
    return _ray_for_the_block


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
