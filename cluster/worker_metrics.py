"""Prometheus metrics of a worker replica, through Ray's metrics (exported by every Ray node's agent).

Names (all prefixed `zipserve_worker_`, tagged with `replica`):
  requests_total{status}        requests by outcome: ok, cancelled, rejected, error, aborted
  generated_tokens_total        output tokens
  ttft_seconds                  time to first token inside the worker (histogram)
  itl_seconds                   inter-token latency (histogram)
  pages_used, pages_free        KV pages of the pool
  slots_free                    compressed-request slots still free (budget engines; else free seqs)
  running, waiting              requests decoding / queued in the engine
  compressions_total            compressions run
  compression_seconds_total     host time launching (CPU: running) them
  prefix_cache_hit_rate         hit pages / queried pages since start
"""

from __future__ import annotations

from ray.util import metrics

_LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


class WorkerMetrics:
    def __init__(self, replica: str):
        p, tags = "zipserve_worker_", ("replica",)
        self.requests = metrics.Counter(p + "requests_total", "requests by outcome", tag_keys=tags + ("status",))
        self.tokens = metrics.Counter(p + "generated_tokens_total", "output tokens", tag_keys=tags)
        self.ttft = metrics.Histogram(p + "ttft_seconds", "time to first token", _LATENCY_BOUNDS, tag_keys=tags)
        self.itl = metrics.Histogram(p + "itl_seconds", "inter-token latency", _LATENCY_BOUNDS, tag_keys=tags)
        self.gauges = {name: metrics.Gauge(p + name, desc, tag_keys=tags) for name, desc in (
            ("pages_used", "KV pages in use"), ("pages_free", "KV pages free"), ("slots_free", "free request slots"),
            ("running", "requests running"), ("waiting", "requests waiting"),
            ("prefix_cache_hit_rate", "prefix cache hit pages / queried pages"))}
        self.compressions = metrics.Counter(p + "compressions_total", "compressions run", tag_keys=tags)
        self.compression_s = metrics.Counter(p + "compression_seconds_total", "compression time", tag_keys=tags)
        for m in (self.requests, self.tokens, self.ttft, self.itl, self.compressions, self.compression_s,
                  *self.gauges.values()):
            m.set_default_tags({"replica": replica})
        self._last = {"compressions": 0, "compression_seconds": 0.0}

    def publish(self, stats: dict) -> None:
        g = self.gauges
        g["pages_used"].set(stats["used_pages"])
        g["pages_free"].set(stats["free_pages"])
        g["slots_free"].set(stats.get("slots_free", stats["max_num_seqs"] - stats["running"]))
        g["running"].set(stats["running"])
        g["waiting"].set(stats["waiting"])
        q = stats.get("prefix_cache_queries", 0)
        g["prefix_cache_hit_rate"].set(stats.get("prefix_cache_hits", 0) / q if q else 0.0)
        for key, counter in (("compressions", self.compressions), ("compression_seconds", self.compression_s)):
            now = stats.get(key, 0)
            if now > self._last[key]:
                counter.inc(now - self._last[key])
                self._last[key] = now
