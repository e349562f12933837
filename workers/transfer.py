"""Small host <-> device transfers that never make the host wait for the device's queued work.

A plain `.to("cuda")` of a pageable tensor synchronises the stream, and `.cpu()` waits for everything
queued before it: inside a compression on its own stream either would stall the host until the forward
finishes, and the step loop would lose its overlap. These go through pinned memory instead.
"""

from __future__ import annotations

import torch


def to_device(values, dtype, device: torch.device) -> torch.Tensor:
    """A small host list/tensor on `device` without waiting for the device's queued work (pinned copy)."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class HostLater:
    """Device tensors copied to the host in stream order; `ready()` hands back those whose copy finished
    (all of them on the CPU, or with wait=True), oldest first, without blocking otherwise."""

    def __init__(self):
        # (host copy, its event or None, the device tensor kept alive until the copy has landed)
        self._pending: list[tuple[torch.Tensor, torch.cuda.Event | None, torch.Tensor | None]] = []
        self.elements = 0  # elements still in flight

    def put(self, t: torch.Tensor) -> None:
        if t.device.type != "cuda":
            self._pending.append((t, None, None))
        else:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending.append((host, done, t))
        self.elements += t.numel()

    def ready(self, wait: bool = False) -> list[torch.Tensor]:
        out = []
        while self._pending:
            host, done, _ = self._pending[0]
            if done is not None and not done.query():
                if not wait:
                    break
                done.synchronize()
            out.append(host)
            self._pending.pop(0)
            self.elements -= host.numel()
        return out


def keep_for_stream(t: torch.Tensor) -> None:
    """A device tensor made on another stream and read on the current one is about to be dropped: its
    memory must not go back to its stream's pool before the current stream's reads of it have run."""
    if t.is_cuda:
        t.record_stream(torch.cuda.current_stream(t.device))
