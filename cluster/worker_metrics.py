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
  recall_host_bytes             host memory the recall stores hold (compression.recall)
  recalled_pages_total          (layer, head) pages brought back from host memory
  recall_bytes_total{direction} bytes moved for recall: to_host (evictions stored), to_device (recalled)
  recall_dropped_entries_total  evicted entries not kept (pool full, or beyond host_pages)
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
            ("prefix_cache_hit_rate", "prefix cache hit pages / queried pages"),
            ("recall_host_bytes", "host memory held by recall stores"))}
        self.compressions = metrics.Counter(p + "compressions_total", "compressions run", tag_keys=tags)
        self.compression_s = metrics.Counter(p + "compression_seconds_total", "compression time", tag_keys=tags)
        self.recalled = metrics.Counter(p + "recalled_pages_total", "pages recalled from host memory", tag_keys=tags)
        self.recall_bytes = metrics.Counter(p + "recall_bytes_total", "bytes moved for recall",
                                            tag_keys=tags + ("direction",))
        self.recall_dropped = metrics.Counter(p + "recall_dropped_entries_total", "evicted entries not kept",
                                              tag_keys=tags)
        for m in (self.requests, self.tokens, self.ttft, self.itl, self.compressions, self.compression_s,
                  self.recalled, self.recall_bytes, self.recall_dropped, *self.gauges.values()):
            m.set_default_tags({"replica": replica})
        self._counters = {  # engine stats key -> (counter, extra tags): each grows by the stat's increase
            "compressions": (self.compressions, None), "compression_seconds": (self.compression_s, None),
            "recalled_pages": (self.recalled, None), "recall_dropped_entries": (self.recall_dropped, None),
            "recall_bytes_to_host": (self.recall_bytes, {"direction": "to_host"}),
            "recall_bytes_to_device": (self.recall_bytes, {"direction": "to_device"})}
        self._last = dict.fromkeys(self._counters, 0)

    def publish(self, stats: dict) -> None:
        g = self.gauges
        g["pages_used"].set(stats["used_pages"])
        g["pages_free"].set(stats["free_pages"])
        g["slots_free"].set(stats.get("slots_free", stats["max_num_seqs"] - stats["running"]))
        g["running"].set(stats["running"])
        g["waiting"].set(stats["waiting"])
        q = stats.get("prefix_cache_queries", 0)
        g["prefix_cache_hit_rate"].set(stats.get("prefix_cache_hits", 0) / q if q else 0.0)
        g["recall_host_bytes"].set(stats.get("recall_host_bytes", 0))
        for key, (counter, tags) in self._counters.items():
            now = stats.get(key, 0)
            if now > self._last[key]:
                counter.inc(now - self._last[key], tags=tags)
                self._last[key] = now
