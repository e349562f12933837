"""SwiGLU feed-forward with the gate and up projections fused into one matmul."""

import torch
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool, silu_and_mul, reduce=None):
        super().__init__()
        self._reduce = reduce  # tensor parallel: down_proj holds this rank's columns, the ranks' sums add up
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self._silu_and_mul = silu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(self._silu_and_mul(self.gate_up_proj(x)))
        return out if self._reduce is None else self._reduce(out)
