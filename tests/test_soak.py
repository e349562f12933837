"""Soak (marked `soak`, not in CI; `make soak`): steady streamed load for ZIPSERVE_SOAK_S seconds (600 by
default) against 2 worker replicas; page counts return to idle between waves and worker memory stays
flat (resident memory after <= 1.15x + 64 MiB of what it was after warm-up). Twice: full KV, and
compressed with recall of evicted KV (a compression every 16 tokens, the host store in use), whose host
pool must also be back to empty at the end."""

import asyncio
import os
import random
import time

import httpx
import pytest

pytest.importorskip("ray")
from ray import serve  # noqa: E402

from tests.serving import app_url  # noqa: E402
from tests.test_reliability import ENGINE, NAME, _idle_stats, _prompts, _stream  # noqa: E402
from zipserve.cluster.app import build_app  # noqa: E402

pytestmark = pytest.mark.soak

RECALL = dict(ENGINE, budget_blocks=2, compression={"query_window": 4, "recall": {"pages": 1, "host_gib": 0.01}})


@pytest.fixture(scope="module", params=["full KV", "compressed + recall"])
def app(request, qwen3_path, local_ray):
    """(URL, engine options) of a 2-replica app as `zipserve serve` runs it, one per engine setting."""
    engine = ENGINE if request.param == "full KV" else RECALL
    with local_ray(num_cpus=2, serve=True, throughput_optimized=True) as port:
        serve.run(build_app({"model": qwen3_path, "model_name": NAME, "engine": engine,
                             "workers": {"num_replicas": 2, "num_cpus": 0},
                             "ingress": {"max_concurrent_requests": 128, "request_timeout_s": 120}}),
                  name="zipserve", route_prefix="/")
        yield app_url(port), engine


def test_soak_steady_load_memory_and_pages_flat(app):
    url, engine = app
    duration = float(os.environ.get("ZIPSERVE_SOAK_S", 600))

    async def wave(seed):
        rng = random.Random(seed)
        async with httpx.AsyncClient(timeout=180) as c:
            res = await asyncio.gather(*[_stream(c, url, p, max_tokens=rng.randint(16, 120)) for p in _prompts(48, seed)])
        assert all(r[0] == 200 and r[2] is None and r[3] for r in res)

    asyncio.run(wave(0))  # warm-up
    base = _idle_stats("zipserve", 2)
    t0, waves = time.time(), 0
    while time.time() - t0 < duration:
        asyncio.run(wave(waves + 1))
        waves += 1
    end = _idle_stats("zipserve", 2)
    if "compression" in engine:  # the recall store was used, and gave every host page back
        assert all(s["compressions"] > 0 and s["recalled_pages"] > 0 for s in end.values()), end
        assert all(s["recall_host_pages_used"] == 0 for s in end.values()), end
    for r, s in end.items():
        assert s["rss_bytes"] <= base[r]["rss_bytes"] * 1.15 + (64 << 20), (r, base[r]["rss_bytes"], s["rss_bytes"])
    print(f"soak: {waves} waves in {time.time() - t0:.0f} s; rss MiB before/after:",
          {r[-6:]: (base[r]["rss_bytes"] >> 20, s["rss_bytes"] >> 20) for r, s in end.items()})
