"""The model runner: owns the model, the KV page tensors and device buffers; runs what it is told.

It turns the scheduler's chunks into flat device tensors (token ids, positions, cache slots, page
tables), runs one forward pass, and computes logits only for the rows that sample.
"""

from __future__ import annotations

import logging
import time

import torch

from zipserve.workers.config import EngineConfig
from zipserve.workers.layers.attention import AttentionMetadata
from zipserve.workers.block_manager import CompactionPlan
from zipserve.workers.compressor import Compressor, layers_at_once
from zipserve.workers.cuda_graph import DecodeGraphs
from zipserve.workers.host_store import HostKVStore
from zipserve.workers.layers.backend import get_kernel_set
from zipserve.workers.models import load_model
from zipserve.workers.parallel import TPGroup
from zipserve.kernels.sampling import DRAWS
from zipserve.workers.sampler import to_device
from zipserve.workers.scheduler import ScheduledChunk

log = logging.getLogger(__name__)

_CPU_DEFAULT_KV_BYTES = 4 << 30
_ALIGN = 16  # elements: device index slices start on this boundary (see _upload)


class ModelRunner:
    def __init__(self, cfg: EngineConfig, max_model_len: int, tp: TPGroup = TPGroup()):
        self.cfg = cfg
        self.device, self.dtype = cfg.torch_device, cfg.torch_dtype
        self.block_size = cfg.block_size
        self.kernels = get_kernel_set(cfg.resolved_backend, cfg.fused_elementwise)  # the model builds its own
        self.model = load_model(cfg.model, self.device, self.dtype, max_model_len, cfg.load_format, cfg.seed,
                                cfg.resolved_backend, cfg.fused_elementwise, tp)
        self.args = a = self.model.args  # this rank's heads under tensor parallelism
        self.max_model_len = max_model_len
        self.compressing = cfg.budget_blocks is not None
        self.global_scores = self.compressing and cfg.compression.use_global_score
        self.recall = cfg.compression.recall if self.compressing else None
        # Every rank must hold the same pages: their page tables (and schedulers) are identical.
        self.num_blocks = tp.min_int(self._plan_num_blocks(max_model_len))
        dev = self.device
        self.kv_cache = torch.empty(2, a.num_layers, self.num_blocks, self.block_size, a.num_kv_heads, a.head_dim,
                                    device=dev, dtype=self.dtype)
        self.compressor = None
        self.compress_stream = None
        if self.compressing:
            Q = cfg.compression.query_window
            # One row per request slot, plus a spare that padded CUDA-graph rows write into.
            q_window = torch.zeros(a.num_layers, cfg.max_num_seqs + 1, Q, a.num_heads, a.head_dim, device=dev,
                                   dtype=self.dtype)
            scores = (torch.zeros(a.num_layers, self.num_blocks, self.block_size, a.num_kv_heads, device=dev)
                      if self.global_scores else None)
            self.compressor = Compressor(cfg.compression, self.kv_cache, q_window, scores, self.block_size,
                                         a.head_dim**-0.5, backend=cfg.resolved_backend,
                                         max_batch_tokens=self.compression_batch_tokens)
            if self.recall is not None:
                positions = torch.zeros(a.num_layers, self.num_blocks, self.block_size, a.num_kv_heads, device=dev,
                                        dtype=torch.int32)
                store = HostKVStore(a.num_layers, a.num_kv_heads, a.head_dim, self.block_size, self.recall_host_pages,
                                    self.dtype, dev, self.recall.host_pages, self.kernels.copy_runs)
                self.compressor.use_recall(store, positions)
        self.clock = None  # a GpuClock when a benchmark measures GPU time per region
        self.graphs = None
        self.prompt_spans, self.prompt_hidden = [], None  # prompt positions to score (execute -> score_prompts)
        # No graphs under tensor parallelism: the collectives would have to be captured as well.
        if dev.type == "cuda" and cfg.resolved_backend == "triton" and not cfg.enforce_eager and tp.size == 1:
            top = min(cfg.max_num_seqs, cfg.cuda_graph_max_batch)
            sizes = sorted({b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256) if b < top} | {top})
            self.graphs = DecodeGraphs(self.model, self.kv_cache, self.compressor.q_window if self.compressor else None,
                                       sizes, max_model_len, self.block_size)
        if dev.type == "cuda" and cfg.resolved_backend == "triton":
            t = time.perf_counter()
            self._warm_up()
            log.info("attention kernels for eager steps compiled in %.1f s", time.perf_counter() - t)
        log.info("KV cache: %d pages of %d tokens (%.2f GiB, %s %s)%s", self.num_blocks, self.block_size,
                 self.num_blocks * self.bytes_per_block / 2**30, dev, self.dtype,
                 f"; compression: budget {cfg.budget_blocks} pages, window buffers {self.window_bytes / 2**20:.1f} MiB, "
                 f"scratch {self.compression_scratch_bytes / 2**20:.1f} MiB" if self.compressing else "")

    @property
    def bytes_per_block(self) -> int:
        """K and V of one page over all layers, plus its global scores (fp32) when those are on and its
        entries' positions (int32) under recall."""
        a = self.args
        kv = 2 * a.num_layers * self.block_size * a.num_kv_heads * a.head_dim * torch.finfo(self.dtype).bits // 8
        scores = a.num_layers * self.block_size * a.num_kv_heads * 4 if self.global_scores else 0
        positions = a.num_layers * self.block_size * a.num_kv_heads * 4 if self.recall is not None else 0
        return kv + scores + positions

    @property
    def recall_host_pages(self) -> int:
        """(layer, head) pages the recall pool holds in host_gib of pinned memory."""
        return int(self.recall.host_gib * 2**30) // HostKVStore.page_bytes(self.block_size, self.args.head_dim, self.dtype)

    @property
    def recall_device_bytes(self) -> int:
        """The recall pool's key summaries (min and max per page, fp32), which live on the device."""
        return 0 if self.recall is None else self.recall_host_pages * 2 * self.args.head_dim * 4

    @property
    def window_bytes(self) -> int:
        if not self.compressing:
            return 0
        a = self.args
        return (a.num_layers * self.cfg.max_num_seqs * self.cfg.compression.query_window * a.num_heads * a.head_dim
                * torch.finfo(self.dtype).bits // 8)

    @property
    def compression_batch_tokens(self) -> int:
        """Cache entries the compressor scores at once in a full layer group: four page-boundary
        compressions, the largest captured graph's batch (more due in one step run as several batches,
        at about the same cost per request). A longer single compression (a long prompt at the end of its
        prefill) scores fewer layers at once instead (Compressor.layer_group_for)."""
        return 4 * ((self.cfg.budget_blocks or 0) + 1) * self.block_size

    @property
    def compression_graph_sizes(self) -> tuple[int, ...]:
        """Batch sizes of the compressions captured as CUDA graphs (Compressor.capture_graphs): up to
        max_num_seqs and to what one batch holds (compression_batch_tokens); none where the engine runs
        eagerly, off the Triton backend, where the config depends on the prompt (prompt_fraction), or under
        recall (its compressions run plan by plan)."""
        c = self.cfg
        if not (self.compressing and self.device.type == "cuda" and c.resolved_backend == "triton"
                and not c.enforce_eager and not c.compression.prompt_fraction and self.recall is None):
            return ()
        per = self.compression_batch_tokens // ((c.budget_blocks + 1) * self.block_size)
        return tuple(b for b in (1, 2, 4) if b <= min(per, c.max_num_seqs))

    @property
    def compression_scratch_bytes(self) -> int:
        """Upper bound of the compressor's temporaries: one eager batch (compression_batch_tokens entries in
        a full layer group, or one request of max_model_len in fewer layers), plus the captured graphs'
        memory pool, which the eager allocator cannot reuse: the scratch of the largest captured batch (the
        graphs share one pool and run one at a time)."""
        if not self.compressing:
            return 0
        lg = min(self.cfg.compression.layer_group, self.args.num_layers)
        cap, longest = self.compression_batch_tokens, self.max_model_len
        eager = max(self._scratch_bytes(cap, lg), self._scratch_bytes(longest, layers_at_once(longest, lg, cap)))
        graphs = self.compression_graph_sizes
        tokens = max(graphs, default=0) * (self.cfg.budget_blocks + 1) * self.block_size
        return eager + (self._scratch_bytes(tokens, lg) if graphs else 0)

    def _scratch_bytes(self, n: int, lg: int) -> int:
        """Upper bound of the compressor's temporaries for one batch of n entries in lg layers at once
        (scratch grows with the entries, whichever requests hold them), fp32."""
        a, c = self.args, self.cfg.compression
        logits = 2 * lg * a.num_heads * c.query_window * n * 4  # window logits + probabilities
        gathered = 3 * lg * n * a.num_kv_heads * a.head_dim * 4  # K, V copies and normalised keys
        per_token = 6 * lg * a.num_kv_heads * n * 4  # A, G, S, R, sort keys and indices
        tile = self.block_size if c.lightning_redundancy else min(n, 1024)
        redundancy = 2 * lg * a.num_kv_heads * tile * (self.block_size if c.lightning_redundancy else n) * 4
        if c.lightning_redundancy:
            redundancy *= -(-n // self.block_size)
        return logits + gathered + per_token + (redundancy if c.use_redundancy else 0)

    def _plan_num_blocks(self, max_model_len: int) -> int:
        cfg = self.cfg
        if cfg.num_blocks is not None:
            return cfg.num_blocks
        if cfg.kv_cache_memory_gb is not None:
            budget = (int(cfg.kv_cache_memory_gb * 2**30) - self.window_bytes - self.compression_scratch_bytes
                      - self.recall_device_bytes)
        elif self.device.type == "cuda":
            # Blocks the allocator cached while loading the weights are free to the pool, not in use.
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            reserve = total * (1 - cfg.gpu_memory_utilization) + 2 * 2**30  # activations and workspace
            budget = int(free - reserve) - self.window_bytes - self.compression_scratch_bytes - self.recall_device_bytes
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
    def execute(self, chunks: list[ScheduledChunk], last_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step; returns fp32 logits for the chunks that sample, in chunk order.

        Host work is kept small: every index array is built in Python and crosses to the device in one
        int64 and one int32 copy through pinned memory (queued before the forward, so the host never waits
        for the GPU here, and compression can be launched beside the forward).

        last_tokens: the previous step's sampled tokens, still on the device (async scheduling); a request
        whose input token is not on the host yet (seq.pending_row) reads it from there.

        Chunks of requests that asked for prompt logprobs also keep the hidden states of the prompt positions
        they cover, for `score_prompts` (such steps run eagerly)."""
        bs = self.block_size
        Q = self.cfg.compression.query_window
        ids, pos, slots, qsl, kv_lens, sample_rows = [], [], [], [0], [], []
        win_rows, win_slots, win_pos = [], [], []
        from_device, device_rows = [], []  # input rows filled on the device, and their rows in last_tokens
        prompt_rows, self.prompt_spans = [], []  # rows whose logits score the next prompt token
        for c in chunks:
            seq, n = c.seq, c.num_new_tokens
            s, kv = seq.num_computed_tokens, seq.kv_len  # position and cache index of the first new token
            table = seq.block_table
            if n == 1:
                if s < len(seq.token_ids):
                    ids.append(seq.token_ids[s])
                else:  # its last sampled token: still on the device
                    assert last_tokens is not None and seq.pending_row is not None, f"{seq.request_id}: token {s} unknown"
                    from_device.append(len(ids))
                    device_rows.append(seq.pending_row[1])
                    ids.append(0)
                pos.append(s)
                slots.append(table[kv // bs] * bs + kv % bs)
            else:
                assert s + n <= len(seq.token_ids), f"{seq.request_id}: a prefill chunk reaches a token not yet known"
                ids.extend(seq.token_ids[s : s + n])
                pos.extend(range(s, s + n))
                slots.extend(table[i // bs] * bs + i % bs for i in range(kv, kv + n))
            if seq.window_slot is not None:  # the chunk's last Q queries go to the request's ring
                for j in range(max(0, n - Q), n):
                    win_rows.append(qsl[-1] + j)
                    win_slots.append(seq.window_slot)
                    win_pos.append((kv + j) % Q)
            if seq.params.prompt_logprobs is not None:  # row j predicts prompt token s + j + 1
                first, last = max(s + 1, len(seq.prompt_logprobs) + 1), min(s + n, seq.num_prompt_tokens - 1)
                if first <= last:
                    self.prompt_spans.append((seq, first, last - first + 1))
                    prompt_rows.extend(qsl[-1] + t - 1 - s for t in range(first, last + 1))
            qsl.append(qsl[-1] + n)
            kv_lens.append(kv + n)
            if c.samples:
                sample_rows.append(qsl[-1] - 1)
        tables = [c.seq.block_table for c in chunks]
        tick = self.clock.start("forward") if self.clock is not None else None
        if self.graphs is not None and len(ids) == len(chunks) and self.graphs.fits(len(chunks)) and not prompt_rows:
            spare = self.graphs.spare_slot or 0
            wslots = [c.seq.window_slot if c.seq.window_slot is not None else spare for c in chunks]
            wpos = [c.seq.kv_len % Q for c in chunks]
            h = self.graphs.run(ids, pos, slots, tables, kv_lens, wslots, wpos,
                                fill=self._fill_ids(from_device, device_rows, last_tokens))
            if len(sample_rows) != len(chunks):
                h = h[self._upload([sample_rows], torch.long)[0]]
        else:
            h = self._eager_forward(ids, pos, slots, tables, qsl, kv_lens, win_rows, win_slots, win_pos,
                                    sample_rows + prompt_rows, self._fill_ids(from_device, device_rows, last_tokens))
            h, self.prompt_hidden = h[: len(sample_rows)], h[len(sample_rows):]
        logits = self.model.compute_logits(h) if sample_rows else torch.empty(0, self.args.vocab_size, device=self.device)
        if tick is not None:
            self.clock.stop(tick)
        return logits

    @torch.inference_mode()
    def score_prompts(self, slice_rows: int = 256) -> list[tuple]:
        """(seq, first prompt position, LogprobRows) for the prompt positions the last `execute` kept, their
        logits made a slice at a time (a long prompt's full logits would not fit beside the KV cache)."""
        from zipserve.workers.sampler import LogprobRows

        spans, self.prompt_spans = self.prompt_spans, []
        out, off = [], 0
        for seq, first, k in spans:
            n = seq.params.prompt_logprobs
            targets = torch.tensor(seq.token_ids[first : first + k], device=self.device)
            parts = []
            for a in range(0, k, slice_rows):
                lp = self.model.compute_logits(self.prompt_hidden[off + a : off + min(k, a + slice_rows)]).log_softmax(-1)
                vals, ids = lp.topk(n, dim=-1)
                parts.append((lp.gather(1, targets[a : a + slice_rows, None]).squeeze(1), vals, ids))
            out.append((seq, first, LogprobRows(list(range(k)), [n] * k, *(torch.cat(x) for x in zip(*parts)))))
            off += k
        return out

    def _fill_ids(self, rows: list[int], src: list[int], last_tokens: torch.Tensor | None):
        """A function that writes last_tokens[src] into rows of an uploaded ids tensor (None if no row)."""
        if not rows:
            return None
        rows_d, src_d = self._upload([rows, src], torch.long)

        def fill(ids_d: torch.Tensor) -> None:
            ids_d.index_copy_(0, rows_d, last_tokens.index_select(0, src_d))
        return fill

    def _upload(self, arrays: list[list[int]], dtype) -> list[torch.Tensor]:
        """Concatenate host int lists, copy them to the device at once, return the device slices. Each slice
        starts on a 16-element boundary: Triton specializes kernels on pointer alignment, so slices whose
        alignment followed the batch's lengths would compile new kernel variants while requests wait."""
        flat, starts = [], []
        for a in arrays:
            starts.append(len(flat))
            flat.extend(a)
            flat.extend([0] * (-len(flat) % _ALIGN))
        flat = torch.tensor(flat, dtype=dtype)
        if self.device.type == "cuda":
            flat = flat.pin_memory().to(self.device, non_blocking=True)  # the pinned block is reused only
            # after this copy has completed (PyTorch's host allocator records the stream)
        return [flat[i : i + len(a)] for i, a in zip(starts, arrays)]

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Compile the attention variants eager steps need before the first request arrives (a kernel compiled
        while requests wait is added to their time to first token): a ragged prefill, and mixed batches of one
        prefill chunk beside a few decode rows (split-K launch) and beside max_num_seqs decode rows (one
        partition each). No K/V is written (slot -1); the outputs are dropped. Then the compression kernels,
        the compression graphs (they write free pages only), and top-p's kernels."""
        bs, top = self.block_size, self.max_model_len
        few = [(1, min(top, 3 * bs - 5))] * 2
        many = [(1, min(top, bs - 3))] * max(1, self.cfg.max_num_seqs - 1)
        for rows in ([(min(top, 37),) * 2, (min(top, 3 * bs + 11),) * 2], few + [(min(top, 45),) * 2],
                     many + [(min(top, 19),) * 2]):
            ids, pos, qsl, kv_lens, tables = [], [], [0], [], []
            for q_len, kv_len in rows:
                ids.extend([0] * q_len)
                pos.extend(range(kv_len - q_len, kv_len))
                qsl.append(qsl[-1] + q_len)
                kv_lens.append(kv_len)
                tables.append([0] * -(-kv_len // bs))
            win = [] if self.compressor is None else [qsl[-1] - 1]
            spare = [] if self.compressor is None else [self.compressor.q_window.shape[1] - 1]
            self._eager_forward(ids, pos, [-1] * len(ids), tables, qsl, kv_lens, win, spare, [0] * len(win),
                                [qsl[-1] - 1])
        if self.compressor is not None:
            slot = self.compressor.q_window.shape[1] - 1  # the spare window slot
            self.compressor.warm_up(self.cfg.budget_blocks, slot, 37)
            if self.compression_graph_sizes:
                self.compressor.capture_graphs(self.cfg.budget_blocks, slot, self.compression_graph_sizes)
        half = to_device([0.5, 0.9], torch.float32, self.device)
        self.kernels.top_p_threshold(torch.randn(2, self.args.vocab_size, device=self.device), half)
        self.kernels.sample_top_p(torch.randn(2, self.args.vocab_size, device=self.device), half, half,
                                  torch.rand(2, DRAWS + 1, device=self.device))
        torch.cuda.synchronize(self.device)

    def _eager_forward(self, ids, pos, slots, tables, qsl, kv_lens, win_rows, win_slots, win_pos, sample_rows, fill=None):
        width = max(len(t) for t in tables)
        flat_tables = [b for t in tables for b in t + [0] * (width - len(t))]
        ids_d, pos_d, slots_d, rows_d, wr_d, ws_d, wp_d = self._upload(
            [ids, pos, slots, sample_rows, win_rows, win_slots, win_pos], torch.long)
        qsl_d, kvl_d, tab_d = self._upload([qsl, kv_lens, flat_tables], torch.int32)
        if fill is not None:
            fill(ids_d)
        windows = bool(win_rows)
        meta = AttentionMetadata(
            slot_mapping=slots_d, block_tables=tab_d.view(len(tables), width), query_start_loc=qsl_d, kv_lens=kvl_d,
            max_query_len=max(qsl[i + 1] - qsl[i] for i in range(len(tables))), max_kv_len=max(kv_lens),
            window_rows=wr_d if windows else None, window_slots=ws_d if windows else None,
            window_pos=wp_d if windows else None)
        q_window = self.compressor.q_window if self.compressor is not None else None
        h = self.model(ids_d, pos_d, self.kv_cache, meta, q_window)
        return h[rows_d]

    def mark(self):
        """An event at the current point of the main stream (None off CUDA)."""
        if self.device.type != "cuda":
            return None
        ev = torch.cuda.Event()
        ev.record()
        return ev

    def compact(self, plans: list[CompactionPlan], overlap: bool = False, after=None):
        """Run the compression stage for these plans (scores, selection, packing).

        overlap=True on CUDA: launch it on the compressor's own stream after the work queued so far, and
        return the event that marks its end (the caller frees pages and resumes those requests only once
        it has completed; other requests keep decoding meanwhile). `after`: a main-stream event to start
        after (the end of the step that wrote the data), so work queued since then runs concurrently.
        Otherwise it runs in order; None."""
        if not plans:
            return None
        if not (overlap and self.device.type == "cuda"):
            tick = self.clock.start("compression") if self.clock is not None else None
            self.compressor.run(plans)
            if tick is not None:
                self.clock.stop(tick)
            return None
        if self.compress_stream is None:
            self.compress_stream = torch.cuda.Stream(self.device)
        if after is not None:
            self.compress_stream.wait_event(after)
        else:
            self.compress_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.compress_stream):
            tick = self.clock.start("compression") if self.clock is not None else None
            self.compressor.run(plans)
            if tick is not None:
                self.clock.stop(tick)
            done = torch.cuda.Event()
            done.record(self.compress_stream)
        return done
