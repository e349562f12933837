"""GPU time of labelled regions (forward, compression), measured with CUDA event pairs on whatever stream
the region runs, resolved lazily: recording never makes the host wait. Benchmarks switch it on."""

from __future__ import annotations

from collections import defaultdict

import torch


class GpuClock:
    def __init__(self):
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._ms: dict[str, float] = defaultdict(float)

    def start(self, label: str):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()  # on the current stream
        return label, ev

    def stop(self, token) -> None:
        label, start = token
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((label, start, end))
        if len(self._pending) > 4096:
            self._resolve()

    def _resolve(self, wait: bool = False) -> None:
        keep = []
        for label, s, e in self._pending:
            if wait:
                e.synchronize()
            if e.query():
                self._ms[label] += s.elapsed_time(e)
            else:
                keep.append((label, s, e))
        self._pending = keep

    def totals_ms(self) -> dict[str, float]:
        """Milliseconds per label (waits for regions still running)."""
        self._resolve(wait=True)
        return dict(self._ms)
