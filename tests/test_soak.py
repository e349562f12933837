"""Soak (marked `soak`, not in CI; `make soak`): steady streamed load for ZIPSERVE_SOAK_S seconds (600 by
default) against 2 worker replicas; page counts return to idle between waves and worker memory stays
flat (resident memory after <= 1.15x + 64 MiB of what it was after warm-up)."""

import asyncio
import os
import random
import time

import httpx
import pytest

from tests.test_reliability import _idle_stats, _prompts, _stream, app  # noqa: F401 -- the app fixture

pytestmark = pytest.mark.soak


def test_soak_steady_load_memory_and_pages_flat(app):  # noqa: F811
    url, *_ = app
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
    for r, s in end.items():
        assert s["rss_bytes"] <= base[r]["rss_bytes"] * 1.15 + (64 << 20), (r, base[r]["rss_bytes"], s["rss_bytes"])
    print(f"soak: {waves} waves in {time.time() - t0:.0f} s; rss MiB before/after:",
          {r[-6:]: (base[r]["rss_bytes"] >> 20, s["rss_bytes"] >> 20) for r, s in end.items()})
