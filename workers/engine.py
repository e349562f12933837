"""The engine step loop: schedule -> run the model -> sample -> append, detokenize, stop -> free.

This is the API the serving worker drives: `add_request`, `step` (returns what changed), `abort_request`
(frees the request's pages at once) and `stats`. `LLM` (workers/llm.py) is a thin offline wrapper. The
engine decides when a request ends by its tokens; its text, stop strings and outputs are the output
processor's (workers/output_processor.py).

Async scheduling (`async_scheduling`, on by default): a step's sampled tokens stay on the device; the next
step is scheduled and launched first (its inputs read those tokens on the device), and only then are they
copied back and appended, detokenized and checked for stops -- while the GPU runs the next step. So the
host's work of one step hides behind the GPU's work of the next (at small model shapes that host work is
as long as the step itself). The scheduler sees a pending token as a token (`Sequence.num_pending`), so its
decisions are those of a synchronous engine; what differs is that a request that ends by a token's value
(EOS, stop token or string) is known one step late: it computed one more token, which is dropped. A
request that reaches max_tokens or max_model_len ends at once, whatever the token. Logprobs travel back
with the tokens (workers/sampler.py LogprobRows); steps with teacher forcing, and tensor parallelism, run
synchronously.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from zipserve.workers.bad_words import apply_bad_words, needs_known_tokens, tokenize_bad_words
from zipserve.workers.block_manager import BlockManager
from zipserve.workers.compaction_queue import CompactionQueue
from zipserve.workers.grammar import GrammarBook, validate_structured
from zipserve.workers.config import EngineConfig
from zipserve.workers.model_runner import ModelRunner
from zipserve.workers.models import read_model_args
from zipserve.workers.output_processor import OutputProcessor
from zipserve.workers.outputs import RequestOutput
from zipserve.workers.parallel import TPGroup
from zipserve.workers.penalties import PenaltyState
from zipserve.workers.request_limits import RequestError, check_prompt
from zipserve.workers.sampler import LogprobRows, SamplingError, sample, sample_on_device
from zipserve.workers.sampling_params import SamplingParams
from zipserve.workers.scheduler import Scheduler
from zipserve.workers.sequence import Sequence, Status
from zipserve.workers.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclass(eq=False)
class PendingStep:
    """One step's sampled tokens, not yet on the host (async scheduling)."""

    seqs: list[Sequence]  # the requests that sampled, in row order
    tokens: torch.Tensor  # [rows] int64 on the device: the next step's inputs read them there
    host: torch.Tensor  # their copy on the host (pinned), then a bad-row flag per row if `checks`
    ready: object  # a CUDA event: the host copies have landed (None off CUDA)
    checks: bool
    logprobs: LogprobRows | None  # host copies, for the rows that asked


class LLMEngine:
    def __init__(self, config: EngineConfig, tp: TPGroup = TPGroup()):
        """One engine, or one rank of a tensor-parallel engine (workers/tensor_parallel.py): every rank runs
        this same engine in lockstep on its shard of the heads."""
        self.config = cfg = config
        self.tp = tp
        args, _ = read_model_args(cfg.model)
        self.max_model_len = cfg.max_model_len or args.max_position_embeddings
        if self.max_model_len > args.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings {args.max_position_embeddings}")
        torch.manual_seed(cfg.seed)
        self.runner = ModelRunner(cfg, self.max_model_len, tp)
        self.model_args = args
        pool_tokens = self.runner.num_blocks * cfg.block_size
        if cfg.budget_blocks is not None and self.runner.num_blocks < cfg.budget_blocks + 1:
            raise ValueError(f"the KV pool has {self.runner.num_blocks} pages, fewer than one request's "
                             f"budget + 1 = {cfg.budget_blocks + 1}")
        if pool_tokens < self.max_model_len and cfg.budget_blocks is None:
            if cfg.max_model_len is not None:
                raise ValueError(f"the KV pool holds {pool_tokens} tokens, less than max_model_len "
                                 f"{cfg.max_model_len}: give more pages/memory or lower max_model_len")
            log.warning("lowering max_model_len from %d to %d, what the KV pool holds", self.max_model_len, pool_tokens)
            self.max_model_len = pool_tokens
        self.block_manager = BlockManager(self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_cache)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens, self.max_model_len,
                                   borrow=cfg.borrow_reserved_pages and cfg.budget_blocks is not None,
                                   headroom_steps=cfg.admission_headroom_steps)
        self.compactions = CompactionQueue(self.runner, self.block_manager, land_in_lockstep=tp.size > 1)
        self.pending: PendingStep | None = None  # the last step's tokens, still on the device
        self.tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
        self.output_processor = OutputProcessor(self.tokenizer)  # text, stop strings, outputs
        self.eos_token_ids = set(args.eos_token_ids)
        if not self.eos_token_ids and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids = {self.tokenizer.eos_token_id}
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.penalties = PenaltyState(self.runner.device, self.eos_token_ids)
        self.grammars = GrammarBook(self.tokenizer, args.vocab_size, sorted(self.eos_token_ids))
        # Quality evaluation (benchmarks/quality): called with the sampling requests and their logits rows each
        # step; if it returns tokens, those are appended instead of sampled ones (teacher forcing).
        self.step_observer: Callable[[list[Sequence], torch.Tensor], list[int] | None] | None = None
        self.requests: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.num_prefill_tokens_computed = 0  # prompt tokens, and generated ones recomputed after a preemption

    # ---- requests ------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"the model folder {self.config.model!r} has no tokenizer; pass token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    resume_token_ids: list[int] | None = None) -> None:
        """Validate and queue a request; raises ValueError on bad input and changes nothing then.

        resume_token_ids: output tokens a previous worker already produced (and the client received) for
        this request, when it moves here after that worker died. They are prefilled with the prompt and
        count as output (max_tokens, stop strings); their text is replayed token by token exactly as it
        was first emitted, so what streams next continues the client's text without gap or repeat."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.tokenize(prompt)
        resume = list(resume_token_ids or [])
        self.validate_request(ids + resume, params)
        if len(resume) >= params.max_tokens:
            raise ValueError(f"{len(resume)} resumed tokens leave nothing to generate (max_tokens {params.max_tokens})")
        budget = params.budget_blocks if params.budget_blocks is not None else self.config.budget_blocks
        seq = Sequence(request_id, list(ids), len(ids), params, next(self._arrivals), budget_blocks=budget)
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)
        if params.bad_words:
            seq.bad_word_ids = tokenize_bad_words(self.tokenizer, params.bad_words)
        seq.token_ids += resume
        self.output_processor.add_request(seq)  # (replays the resumed tokens' text)
        self.requests[request_id] = seq
        if params.structured is not None:
            self.grammars.submit(seq)  # scheduled once its grammar has compiled (step: _admit_constrained)
        else:
            self.scheduler.add(seq)

    def facts(self) -> dict:
        """What a caller needs to validate requests without the engine (see check_request)."""
        return {"vocab_size": self.model_args.vocab_size, "max_model_len": self.max_model_len,
                "engine_budget_blocks": self.config.budget_blocks, "block_size": self.config.block_size,
                "engine_recall_pages": self.runner.recall.pages if self.runner.recall is not None else None,
                "num_blocks": self.block_manager.num_blocks, "max_num_seqs": self.config.max_num_seqs}

    def validate_request(self, ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming what is wrong with a prompt (token ids) and its params."""
        check_request(ids, params, self.facts())

    def abort_request(self, request_id: str) -> bool:
        """Cancel a request; its pages return to the pool now. False if it is unknown or done."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        seq.finish_reason = "abort"
        self._retire(seq)
        self.output_processor.discard(request_id)
        return True

    def _retire(self, seq: Sequence) -> None:
        """Free a request's pages now, or when its compaction lands (which reads them)."""
        self.penalties.release(seq.request_id)
        if self.grammars.release(seq.request_id):  # still compiling: the scheduler never saw it
            seq.status = Status.FINISHED
        elif not seq.is_finished and not seq.compressing:
            self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        """Free a request's pages, and its recall store (host pages) if it has one."""
        self.scheduler.finish(seq)
        if self.runner.compressor is not None and self.runner.compressor.store is not None:
            self.runner.compressor.store.release(seq.request_id)

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_work() or self.compactions.busy or bool(self.grammars.compiling)
                or (self.pending is not None and bool(self.requests)))  # (else it holds aborted requests only)

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; returns an output for every request that changed (under async
        scheduling: the tokens of the step before, whose values arrive while this one runs)."""
        self._landed(self.compactions.land())
        failed = self._admit_constrained()
        sched = self.scheduler.schedule()
        self._landed(self.compactions.run_now(sched.compactions))  # early ones (pages ran short): before the forward
        if not sched.chunks:
            return failed + self._idle()
        samplers, logits = self._execute(sched)
        outputs = failed + self._sample(samplers, logits)
        self._compression_stage(sched, samplers)
        self.num_steps += 1
        return outputs

    def _idle(self) -> list[RequestOutput]:
        """Nothing to run: the last tokens come back, deferred compressions start (or are waited for)."""
        outputs = self._resolve_pending()
        self.compactions.launch_deferred()
        if not outputs:  # only compressions left to wait for: wait for the oldest
            self.compactions.wait_oldest()
        return outputs

    def _execute(self, sched) -> tuple[list[Sequence], torch.Tensor]:
        """Queue the forward (not waited for), the last step's compressions beside it; returns the requests
        that sample this step and their logits."""
        data_ready = self.runner.mark()  # everything the deferred compressions read is written by now
        last_tokens = self.pending.tokens if self.pending is not None else None
        logits = self.runner.execute(sched.chunks, last_tokens)
        if self.runner.prompt_spans:  # prompt logprobs (evaluation): this step waits for their values
            for seq, first, rows in self.runner.score_prompts():
                seq.prompt_logprobs.extend(rows.by_row(seq.token_ids[first : first + len(rows.rows)]).values())
        self.compactions.launch_deferred(after=data_ready)  # on their own stream, beside this forward
        samplers = [c.seq for c in sched.chunks if c.samples]  # (before the chunks count as computed)
        for c in sched.chunks:
            if c.prefills:
                self.num_prefill_tokens_computed += c.num_new_tokens
            c.seq.num_computed_tokens += c.num_new_tokens
        return samplers, logits

    def _sample(self, samplers: list[Sequence], logits: torch.Tensor) -> list[RequestOutput]:
        """This step's tokens: left on the device for the next step to feed (async scheduling), or taken now.
        Returns the outputs of the tokens whose values are known (the step before's, under async)."""
        if self._overlaps(samplers) and self._reads_tokens(samplers):
            # A grammar's mask (or a multi-token bad word) needs the step before's tokens: append them first
            # (while the GPU runs this step's forward), then mask and sample; requests they ended sample nothing.
            outputs = self._resolve_pending()
            keep = [i for i, s in enumerate(samplers) if s.finish_reason is None]
            if len(keep) < len(samplers):
                samplers, logits = [samplers[i] for i in keep], logits[keep]
            self.pending = self._sample_async(samplers, logits) if samplers else None
            return outputs
        if self._overlaps(samplers):
            pending = self._sample_async(samplers, logits)
            outputs = self._resolve_pending()  # the step before's tokens, while the GPU runs this one
            self.pending = pending
            return outputs
        return self._resolve_pending() + self._sample_now(samplers, logits)

    def _compression_stage(self, sched, samplers: list[Sequence]) -> None:
        """Requests whose cache reached budget + 1 full pages (or a long prompt ended) are compressed. On CUDA
        it is launched beside the next step's forward, on its own stream; the requests it compacts sit out
        until it has landed. Elsewhere it runs now."""
        for c in sched.chunks:  # page hashes need token values: the step before's are all known now
            self.block_manager.commit_full_blocks(c.seq)
        plans = [self.scheduler.plan_compression(s) for s in samplers if s.status is Status.RUNNING]
        plans = [p for p in plans if p is not None]
        if self.runner.device.type == "cuda":
            self.compactions.defer(plans)
        else:
            self._landed(self.compactions.run_now(plans))

    def _overlaps(self, samplers: list[Sequence]) -> bool:
        """Whether this step's tokens may stay on the device until the next step is launched."""
        return (self.config.async_scheduling and bool(samplers) and self.step_observer is None
                and self.tp.size == 1)

    def _sample_async(self, samplers: list[Sequence], logits: torch.Tensor) -> PendingStep:
        """Sample on the device and start the copy back; the requests count the tokens as pending."""
        tokens, bad, logprobs = sample_on_device(logits, [s.params for s in samplers], [s.generator for s in samplers],
                                                 self.generator, self._adjust(samplers), *self._sampling_kernels())
        self.penalties.record(samplers, tokens)
        flat = tokens if bad is None else torch.cat([tokens, bad.long()])
        ready = None
        if flat.device.type == "cuda":
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            logprobs = logprobs.copy_to_host() if logprobs is not None else None
            ready = torch.cuda.Event()
            ready.record()
        else:
            host = flat
        rec = PendingStep(samplers, tokens, host, ready, bad is not None, logprobs)
        for row, seq in enumerate(samplers):
            seq.decoding = True
            seq.num_pending += 1
            seq.pending_row = (rec, row)
            if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                self._finish(seq)  # it ends here whatever the token is: its pages go back now
        return rec

    def _resolve_pending(self) -> list[RequestOutput]:
        """Append the last async step's tokens (waiting for their copy), detokenize, check stops."""
        rec, self.pending = self.pending, None
        if rec is None:
            return []
        if rec.ready is not None:
            rec.ready.synchronize()
        values, n = rec.host.tolist(), len(rec.seqs)
        logprobs = rec.logprobs.by_row(values) if rec.logprobs is not None else {}
        outputs = []
        for row, seq in enumerate(rec.seqs):
            if self.requests.get(seq.request_id) is not seq:
                continue  # aborted, or ended by an earlier token: this one is dropped
            seq.num_pending -= 1
            if seq.pending_row is not None and seq.pending_row[0] is rec:
                seq.pending_row = None
            if rec.checks and values[n + row]:
                outputs.append(self._fail(seq, "invalid sampling distribution"))
            else:
                if row in logprobs:
                    seq.logprobs.append(logprobs[row])
                outputs.append(self._append_token(seq, values[row]))
        return outputs

    def _sample_now(self, samplers: list[Sequence], logits: torch.Tensor) -> list[RequestOutput]:
        """Sample (or take the observer's tokens) and append them in this step."""
        outputs = []
        forced = self.step_observer(samplers, logits) if self.step_observer is not None and samplers else None
        if forced is not None:  # teacher forcing (quality evaluation): the observer's tokens, not sampled ones
            for seq, tok in zip(samplers, forced):
                seq.decoding = True
                outputs.append(self._append_token(seq, tok))
            return outputs
        if not samplers:
            return outputs
        try:
            tokens, logprobs = sample(logits, [s.params for s in samplers], [s.generator for s in samplers],
                                      self.generator, self._adjust(samplers), *self._sampling_kernels())
        except SamplingError as e:  # fail those requests alone; the others sample again
            for row in e.rows:
                outputs.append(self._fail(samplers[row], str(e)))
            keep = [r for r in range(len(samplers)) if r not in set(e.rows)]
            samplers = [samplers[r] for r in keep]
            logits = logits[keep]
            tokens, logprobs = sample(logits, [s.params for s in samplers], [s.generator for s in samplers],
                                      self.generator, self._adjust(samplers),
                                      *self._sampling_kernels()) if samplers else ([], {})
        self.penalties.record(samplers, tokens)
        for row, (seq, tok) in enumerate(zip(samplers, tokens)):
            seq.decoding = True
            if row in logprobs:
                seq.logprobs.append(logprobs[row])
            outputs.append(self._append_token(seq, tok))
        return outputs

    def _sampling_kernels(self) -> tuple:
        """The backend's top-p threshold and nucleus draw (sampler.sample_on_device's last two arguments)."""
        return self.runner.kernels.top_p_threshold, self.runner.kernels.sample_top_p

    def _reads_tokens(self, samplers: list[Sequence]) -> bool:
        """Whether sampling this batch reads the step before's tokens on the host (grammars, bad words)."""
        return self.grammars.constrains(samplers) or any(s.bad_word_ids and needs_known_tokens(s) for s in samplers)

    def _adjust(self, samplers: list[Sequence]):
        """The logits change for this batch's penalties, biases, bad words and grammars (in that order), or
        None (no request uses any)."""
        steps = []
        if PenaltyState.active(samplers):
            steps.append(lambda logits: self.penalties.apply(logits, samplers))
        if any(s.bad_word_ids for s in samplers):
            steps.append(lambda logits: apply_bad_words(logits, samplers))
        if self.grammars.constrains(samplers):
            steps.append(self.grammars.mask(samplers, self.runner.device))
        if not steps:
            return None

        def adjust(logits):
            for step in steps:
                logits = step(logits)
            return logits

        return adjust

    def _admit_constrained(self) -> list[RequestOutput]:
        """Schedule the requests whose grammar has compiled; fail those whose grammar did not. An engine with
        nothing else to do waits a little for the oldest compile rather than spin."""
        if not self.grammars.compiling:
            return []
        idle = not self.scheduler.has_work() and self.pending is None and not self.compactions.running
        outputs = []
        wait = None if self.tp.size > 1 else 0.05 if idle else 0.0  # (ranks step in lockstep)
        for seq, why in self.grammars.ready(wait_s=wait):
            if self.requests.get(seq.request_id) is not seq:
                continue
            if why is None:
                self.scheduler.add(seq)
            else:
                outputs.append(self._fail(seq, why))
        return outputs

    def _fail(self, seq: Sequence, why: str) -> RequestOutput:
        log.error("request %s: %s; it is ended with finish_reason 'error'", seq.request_id, why)
        seq.finish_reason, seq.stop_reason = "error", why
        seq.num_pending, seq.pending_row = 0, None
        self._retire(seq)
        self.requests.pop(seq.request_id, None)
        return self.output_processor.output(seq, [])

    def _landed(self, plans) -> None:
        """Requests that ended (or were aborted) while their compaction ran are retired once it has landed."""
        for plan in plans:
            if plan.seq.finish_reason is not None:
                self._retire(plan.seq)

    def _append_token(self, seq: Sequence, token: int) -> RequestOutput:
        seq.token_ids.append(token)
        self.num_generated_tokens += 1
        p = seq.params
        new_text = self.output_processor.new_text(seq)  # (what the stop strings are looked for in)
        grammar = self.grammars.accept(seq.request_id, token) if p.structured is not None else None
        if grammar == "rejected":  # (the mask allows only tokens the grammar accepts: a bug if seen)
            log.error("request %s: token %d breaks its grammar; ended with finish_reason 'error'", seq.request_id, token)
            seq.finish_reason, seq.stop_reason = "error", "grammar"
        elif grammar == "done" and (p.ignore_eos or token not in self.eos_token_ids):
            seq.finish_reason = "stop"  # the grammar is complete (it ended on a stop token it allows)
        elif not p.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif p.stop and new_text:
            self.output_processor.check_stop_strings(seq, new_text)
        known = len(seq.token_ids)  # (tokens sampled after this one may be pending)
        if seq.finish_reason is None and (known - seq.num_prompt_tokens >= p.max_tokens or known >= self.max_model_len):
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self.output_processor.flush(seq)  # held-back bytes (none after a stop string)
            seq.num_pending, seq.pending_row = 0, None  # tokens sampled after this one are dropped
            self._retire(seq)
            del self.requests[seq.request_id]
        return self.output_processor.output(seq, [token])

    # ---- observability -------------------------------------------------------------------
    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "total_pages": bm.num_blocks,
            "free_pages": bm.num_free_blocks,
            "used_pages": bm.num_blocks - bm.num_free_blocks,
            "cached_pages": bm.num_cached_blocks,
            "block_size": bm.block_size,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "max_num_seqs": self.scheduler.max_num_seqs,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "preemptions": self.scheduler.num_preemptions,
            **self._compression_stats(),
            "steps": self.num_steps,
            "generated_tokens": self.num_generated_tokens,
            "max_model_len": self.max_model_len,
        }

    def routing_state(self, with_hashes: bool = True) -> dict:
        """What the router needs (scheduler/router.py reads it from `record_routing_stats`): capacity,
        queue, and (with_hashes) the hashes of every page this worker holds intact (prompt and generated
        pages); thousands of them on a large pool, so a server refreshes them less often than capacity."""
        bm, sched = self.block_manager, self.scheduler
        state = {
            "block_size": bm.block_size, "total_pages": bm.num_blocks, "free_pages": max(0, sched.available_pages()),
            "max_slots": sched.max_num_seqs, "running": len(sched.running), "waiting": len(sched.waiting),
            "budget_blocks": self.config.budget_blocks, "healthy": True, "timestamp": time.time(),
        }
        if with_hashes:
            cached, unheld, held_once = bm.cached_hashes()
            state.update(cached=[h.hex() for h in cached], unheld=[h.hex() for h in unheld],
                         held_once=[h.hex() for h in held_once])
        return state

    def _compression_stats(self) -> dict:
        B = self.config.budget_blocks
        if B is None:
            return {"budget_blocks": None}
        sched = self.scheduler
        return {
            "budget_blocks": B,
            "slots_total": self.block_manager.num_blocks // (B + 1),
            "slots_free": max(0, sched.available_pages()) // (B + 1),
            "reserved_requests": sum(s.reserved for s in sched.running),
            "compressed_requests": sum(s.compressed for s in sched.running),
            "early_compressions": sched.num_early_compressions,
            "pages_freed_by_compression": self.compactions.pages_freed,
            "compression_scratch_bytes": self.runner.compression_scratch_bytes,
            **self.runner.compressor.stats(),
        }

    def check_invariants(self) -> None:
        """Page pool and per-request invariants (tests call this after every step)."""
        sched, bs = self.scheduler, self.config.block_size
        pending = self.compactions.pending_release()
        self.block_manager.check_invariants(sched.running + list(sched.waiting), pending)
        for s in sched.waiting:
            assert not s.block_table and s.status is Status.WAITING and s.window_slot is None
        for s in sched.running:
            assert s.kv_len <= len(s.block_table) * bs
            if s.budget_blocks is not None and s.decoding:
                assert len(s.block_table) <= s.budget_blocks + 1, f"{s.request_id} holds {len(s.block_table)} pages"
        assert sched.available_pages() >= 0, "reservations exceed free and reclaimable pages"  # (free only, not borrowing)
        slots = [s.window_slot for s in sched.running if s.window_slot is not None]
        assert len(slots) == len(set(slots)) and not set(slots) & set(sched.free_window_slots)
        if self.runner.compressor is not None and self.runner.compressor.store is not None:
            compacting = [p.seq for _, plans in self.compactions.in_flight for p in plans] + self.compactions.deferred
            self.runner.compressor.store.check_invariants({s.request_id for s in sched.running + compacting})


def check_request(ids: list[int], params: SamplingParams, facts: dict) -> None:
    """Raise ValueError naming what is wrong with a prompt (token ids) and its params, given an engine's
    facts (LLMEngine.facts): usable where the engine itself is in another process."""
    vocab = facts["vocab_size"]
    check_prompt(ids, vocab, facts["max_model_len"])
    if any(t >= vocab for t in params.logit_bias):
        raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
    if any(t >= vocab for t in params.allowed_token_ids or []):
        raise ValueError(f"allowed_token_ids must be in [0, {vocab})")
    validate_structured(params.structured)
    if params.budget_blocks is not None and facts["engine_budget_blocks"] is None:
        raise ValueError("this engine runs full KV (budget_blocks=None); per-request budget_blocks needs an "
                         "engine started with a budget")
    if params.budget_blocks is not None and params.budget_blocks + 1 > facts["num_blocks"]:
        raise ValueError(f"budget_blocks must be <= {facts['num_blocks'] - 1} (a request holds budget + 1 pages; "
                         f"the KV pool has {facts['num_blocks']})")
    most = facts.get("engine_recall_pages")
    if params.recall_pages is not None and most is None:
        raise RequestError("this engine keeps no evicted entries; per-request recall_pages needs an engine started "
                           "with compression.recall", "recall_pages")
    if params.recall_pages is not None and params.recall_pages > most:
        raise RequestError(f"recall_pages must be <= {most} (the engine's compression.recall.pages, which its "
                           f"memory is planned for)", "recall_pages")
    if -(-len(ids) // facts["block_size"]) > facts["num_blocks"]:
        raise ValueError(f"prompt has {len(ids)} tokens; the KV pool holds {facts['num_blocks'] * facts['block_size']}")
