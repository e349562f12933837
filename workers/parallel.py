"""Tensor parallelism: the rank's group, sharding arithmetic, and the vocab-parallel embedding.

Megatron-style: q/k/v and gate/up are split by output rows (heads, intermediate units), o_proj and
down_proj by input columns and summed with one all-reduce each; the embedding and the LM head are split
by vocabulary rows. With `size == 1` every collective is a no-op, so one code path serves both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: object = None  # torch.distributed group for tensors (nccl on CUDA, gloo on CPU)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` along the last dimension (in rank order)."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int) -> int:
        """The smallest `value` over the ranks (so every rank sizes its KV pool the same)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        dev = "cpu" if dist.get_backend(self.group) == "gloo" else torch.device("cuda", torch.cuda.current_device())
        t = torch.tensor([value], dtype=torch.int64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def split(self, n: int, what: str) -> int:
        """This rank's share of `n` units (heads, intermediate units); they must divide evenly."""
        if n % self.size:
            raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size ({self.size})")
        return n // self.size

    def vocab_rows(self, vocab: int) -> tuple[int, int]:
        """(first row, rows per rank) of this rank's vocabulary shard; the last shard is padded."""
        per = -(-vocab // self.size)
        return self.rank * per, per


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a slice of the vocabulary's rows; ids outside it look up zeros, and one
    all-reduce sums the slices. Its weight doubles as the tied LM head's shard."""

    def __init__(self, vocab: int, hidden: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.start, self.rows = tp.vocab_rows(vocab)
        self.weight = nn.Parameter(torch.empty(self.rows, hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return nn.functional.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        h = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(h.masked_fill(outside[:, None], 0))
