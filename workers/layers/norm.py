"""RMSNorm layer; the math (fp32, cast back like the reference models) is in kernels/rms_norm.py."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, rms_norm):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self._rms_norm = rms_norm

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalise x (after adding residual, if given); returns (out, new residual) in that case."""
        return self._rms_norm(x, self.weight, self.eps, residual)
