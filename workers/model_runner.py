"""The model runner: owns the model, the KV page tensors and device buffers; runs what it is told.

It turns the scheduler's chunks into flat device tensors (token ids, positions, cache slots, page
tables), runs one forward pass, and computes logits only for the rows that sample.
"""

from __future__ import annotations

import logging

import torch

from workers.config import EngineConfig
from workers.layers.attention import AttentionMetadata
from workers.models import load_model, read_model_args
from workers.scheduler import ScheduledChunk

log = logging.getLogger(__name__)

_CPU_DEFAULT_KV_BYTES = 4 << 30


class ModelRunner:
    def __init__(self, cfg: EngineConfig, max_model_len: int):
        self.cfg = cfg
        self.device, self.dtype = cfg.torch_device, cfg.torch_dtype
        self.block_size = cfg.block_size
        self.model = load_model(cfg.model, self.device, self.dtype, max_model_len)
        self.args = self.model.args
        self.num_blocks = self._plan_num_blocks(max_model_len)
        a = self.args
        self.kv_cache = torch.empty(2, a.num_layers, self.num_blocks, self.block_size, a.num_kv_heads, a.head_dim,
                                    device=self.device, dtype=self.dtype)
        log.info("KV cache: %d pages of %d tokens (%.2f GiB, %s %s)", self.num_blocks, self.block_size,
                 self.kv_cache.numel() * self.kv_cache.element_size() / 2**30, self.device, self.dtype)

    @property
    def bytes_per_block(self) -> int:
        a = self.args
        return 2 * a.num_layers * self.block_size * a.num_kv_heads * a.head_dim * torch.finfo(self.dtype).bits // 8

    def _plan_num_blocks(self, max_model_len: int) -> int:
        cfg = self.cfg
        if cfg.num_blocks is not None:
            return cfg.num_blocks
        if cfg.kv_cache_memory_gb is not None:
            budget = int(cfg.kv_cache_memory_gb * 2**30)
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            reserve = total * (1 - cfg.gpu_memory_utilization) + 2 * 2**30  # activations and workspace
            budget = int(free - reserve)
        else:
            # Enough for every slot at full length, capped: CPU memory is shared with everything else.
            need = cfg.max_num_seqs * -(-max_model_len // self.block_size) * self.bytes_per_block
            budget = min(_CPU_DEFAULT_KV_BYTES, need)
        n = budget // self.bytes_per_block
        if n < 1:
            raise ValueError(f"KV memory budget of {budget / 2**20:.1f} MiB holds no page of "
                             f"{self.bytes_per_block / 2**20:.2f} MiB; lower block_size or give more memory")
        return n

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run one step; returns fp32 logits for the chunks that sample, in chunk order."""
        bs = self.block_size
        ids, pos, qsl, kv_lens, tables, sample_rows = [], [], [0], [], [], []
        for c in chunks:
            s, n = c.seq.num_computed_tokens, c.num_new_tokens
            ids.extend(c.seq.token_ids[s : s + n])
            pos.extend(range(s, s + n))
            qsl.append(qsl[-1] + n)
            kv_lens.append(s + n)
            tables.append(c.seq.block_table)
            if c.samples:
                sample_rows.append(qsl[-1] - 1)
        dev = self.device
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        positions = torch.tensor(pos, dtype=torch.long)
        # Slot of each new token: its page (from the request's table) * block_size + offset.
        owner = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor(qsl[1:]) - torch.tensor(qsl[:-1]))
        slots = table[owner, positions // bs].long() * bs + positions % bs
        meta = AttentionMetadata(
            slot_mapping=slots.to(dev, non_blocking=True),
            block_tables=table.to(dev, non_blocking=True),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32).to(dev, non_blocking=True),
            kv_lens=torch.tensor(kv_lens, dtype=torch.int32).to(dev, non_blocking=True),
        )
        h = self.model(torch.tensor(ids, dtype=torch.long).to(dev, non_blocking=True),
                       positions.to(dev, non_blocking=True), self.kv_cache, meta)
        if not sample_rows:
            return torch.empty(0, self.args.vocab_size, device=dev)
        return self.model.compute_logits(h[torch.tensor(sample_rows, device=dev)])
