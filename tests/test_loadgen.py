"""The load generator (benchmarks/loadgen.py): its figures from hand-made records (per-token latency of merged
chunks, window counting, failures) and a real run against the fixed-rate server (benchmarks/sse_server.py),
whose token counts are known exactly."""

import pytest

pytest.importorskip("aiohttp")

from benchmarks import loadgen  # noqa: E402
from benchmarks.sse_server import start  # noqa: E402
from tests.serving import free_port  # noqa: E402


def _rec(start, events, completion, status=200, done=True, finish="length", error=None):
    return {"start": start, "status": status, "events": events, "finish_reason": finish,
            "completion_tokens": completion, "done": done, "error": error, "end": events[-1][0] if events else start}


def test_merged_chunks_give_per_token_latencies_and_failures_are_counted():
    # A: one token every 10 ms. B: first token, then chunks of 4 tokens every 40 ms: the same 10 ms a token.
    a = _rec(0.0, [(1.0 + 0.01 * i, 1) for i in range(9)], 9)
    b = _rec(0.0, [(2.0, 1)] + [(2.0 + 0.04 * i, 4) for i in range(1, 3)], 9)
    cut = _rec(0.0, [(1.5, 1), (1.6, 1)], 2, finish=None, done=False)
    refused = {"start": 0.0, "status": 429, "events": [], "finish_reason": None, "completion_tokens": None,
               "done": False, "error": "full", "end": 0.1}
    s = loadgen.summarize([a, b, cut, refused], 0.0, max_tokens=9, window=None, slo_ttft_s=1.5, slo_tpot_ms=11)
    assert s["itl_ms_per_token"]["p50"] == pytest.approx(10.0)
    assert s["itl_ms_per_token"]["p99"] == pytest.approx(100.0)  # cut's 100 ms gap: 1 token, the slowest
    assert s["ttft_s"]["p50"] in (pytest.approx(1.0), pytest.approx(2.0))
    assert s["tpot_ms"]["mean"] == pytest.approx(10.0)
    assert s["requests_complete"] == 2 and s["truncated_or_failed_200"] == 1 and s["statuses"] == {"200": 3, "429": 1}
    assert s["tokens"] == 9 + 9 + 2
    assert s["goodput"]["requests"] == 1  # b's first token came after the 1.5 s TTFT bound
    # Window mode counts only tokens that arrived inside the window, and latencies only of requests begun there.
    w = loadgen.summarize([a, b], 0.0, 9, window=(1.0, 1.05), slo_ttft_s=2, slo_tpot_ms=100)
    assert w["tokens"] == 6 and w["tokens_per_s"] == pytest.approx(6 / 0.05) and w["ttft_s"] == {}


@pytest.mark.parametrize("mode", ["requests", "window"])
def test_against_the_fixed_rate_server_every_token_is_counted(mode):
    port = free_port()
    procs = start(port, interval_ms=2, processes=1)
    try:
        url = f"http://127.0.0.1:{port}"
        prompts = loadgen.make_prompts(12, (3, 6))
        if mode == "requests":
            r = loadgen.run(url, "sse", prompts, concurrency=6, max_tokens=40, processes=2)
            assert r["requests_complete"] == 12 and r["statuses"] == {"200": 12}
            assert r["tokens"] == 12 * 40 and r["tokens_per_event"] == 1.0  # usage in every chunk, one token each
            assert r["ttft_s"] and r["itl_ms_per_token"]["p50"] > 0
        else:
            # 5,000 tokens at 2 ms each outlast the window however slow the machine is (the server never sends
            # faster), yet the server pre-encodes them in milliseconds (100,000 took it seconds on a loaded
            # machine, before its first token: the window then counted none).
            r = loadgen.run(url, "sse", prompts, concurrency=6, max_tokens=5_000, mode="window", warmup_s=0.3,
                            window_s=1.0, processes=2)
            assert r["closed_at_window_end"] == 6 and r["truncated_or_failed_200"] == 0
            # At most one token per 2 ms per stream can arrive in the window (plus what queued before it).
            assert 0 < r["tokens"] <= 6 * (1.3 / 0.002)
    finally:
        for p in procs:
            p.kill()
