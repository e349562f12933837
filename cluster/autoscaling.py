"""Serve autoscaling for the worker deployment, driven by compressed-page pressure and queue length.

Each worker reports `page_pressure` (used / total pages), `slot_pressure` (running / slots) and
`waiting` (requests queued in its engine) through `record_autoscaling_stats`; Serve aggregates them over
its look-back window and calls this policy. The desired replica count keeps the mean pressure near
`target_pressure`; a queue deeper than `queue_per_replica` per replica adds a replica even when pages
look fine (prompts waiting for prefill), and scale-down needs an empty queue. Serve then applies
min/max replicas, the up/downscale delays and smoothing from the deployment's autoscaling_config.

Pure apart from reading Serve's context object: unit-tested with a stand-in context.
"""

from __future__ import annotations

import math


class PagePressurePolicy:
    def __init__(self, target_pressure: float = 0.75, queue_per_replica: float = 4.0):
        if not 0 < target_pressure <= 1:
            raise ValueError(f"target_pressure must be in (0, 1], got {target_pressure}")
        self.target_pressure = target_pressure
        self.queue_per_replica = queue_per_replica

    def __call__(self, ctx) -> tuple[int, dict]:
        n = ctx.current_num_replicas
        m = ctx.aggregated_metrics or {}
        pages, slots, waiting = (m.get(k, {}) for k in ("page_pressure", "slot_pressure", "waiting"))
        if n == 0 or not (pages or slots):
            # No reports yet (cold start or scaled to zero): one replica if anything is queued.
            return (max(n, 1) if ctx.total_num_requests > 0 else n), {}
        replicas = set(pages) | set(slots)
        pressure = sum(max(pages.get(r, 0.0), slots.get(r, 0.0)) for r in replicas) / len(replicas)
        queue = sum(waiting.values())
        desired = math.ceil(n * pressure / self.target_pressure - 1e-9)
        if queue > self.queue_per_replica * n:
            desired = max(desired, n + 1)
        elif queue > 0:
            desired = max(desired, n)  # never shrink while requests wait
        return max(desired, 0), {"pressure": pressure, "queue": queue}
