"""The full-KV scheduler under the throughput benchmark's closed loop, with no model and no GPU: what its
admission and preemption rules cost in requests running, preemptions and recomputed tokens.

The engine's own Scheduler and BlockManager run the workload of `benchmarks.throughput --mode window`
through `closed_loop.drive`, stepped as the synchronous engine steps (no async scheduling: a sampled
token is known at once); a step's time is modelled, not measured: the weights and the K/V the step
reads over the card's bandwidth, plus a cost per prefilled token and a fixed overhead per step. Policies
can be compared this way in seconds before a GPU run measures them (the README cites it).

    python -m benchmarks.scheduler_sim --pool-tokens 785664 --block-size 256 --bandwidth-gbps 4250
"""

from __future__ import annotations

import argparse
import json

from benchmarks.closed_loop import Engine, Workload, drive, steady_running
from benchmarks.throughput import _model_bytes
from zipserve.workers.block_manager import BlockManager
from zipserve.workers.config import EngineConfig
from zipserve.workers.sampling_params import SamplingParams
from zipserve.workers.scheduler import Scheduler
from zipserve.workers.sequence import Sequence


class SimulatedEngine:
    """A full-KV engine whose steps take modelled time; the token each step appends is a made-up id."""

    def __init__(self, pool_tokens: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 weight_bytes: float, kv_bytes_per_token: float, bandwidth: float, prefill_s_per_token: float,
                 step_overhead_s: float, headroom_steps: int):
        self.bm = BlockManager(pool_tokens // block_size, block_size, enable_prefix_cache=True)
        self.scheduler = Scheduler(self.bm, max_num_seqs, max_num_batched_tokens, max_model_len=None,
                                   headroom_steps=headroom_steps)
        self.weight_bytes, self.kv_bytes, self.bandwidth = weight_bytes, kv_bytes_per_token, bandwidth
        self.prefill_s, self.overhead_s = prefill_s_per_token, step_overhead_s
        self.now = 0.0
        self.seqs: dict[str, Sequence] = {}
        self.prefilled = self.recomputed = 0
        self._arrivals = 0

    def add(self, rid: str, prompt: list[int], length: int) -> None:
        seq = Sequence(rid, list(prompt), len(prompt), SamplingParams(max_tokens=length, ignore_eos=True),
                       self._arrivals)
        self._arrivals += 1
        self.seqs[rid] = seq
        self.scheduler.add(seq)

    def abort(self, rid: str) -> None:
        seq = self.seqs.pop(rid, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq)

    def step(self) -> list[tuple[str, int, bool]]:
        out = self.scheduler.schedule()
        read = prefill = 0
        for c in out.chunks:
            read += c.seq.kv_len + c.num_new_tokens
            if c.prefills:
                prefill += c.num_new_tokens
                self.recomputed += c.num_new_tokens if c.seq.num_preemptions else 0
        self.prefilled += prefill
        self.now += ((self.weight_bytes + read * self.kv_bytes) / self.bandwidth + prefill * self.prefill_s
                     + self.overhead_s)
        changed = []
        for c in out.chunks:
            seq = c.seq
            samples = c.samples
            seq.num_computed_tokens += c.num_new_tokens
            if samples:
                seq.token_ids.append(1000 + len(seq.token_ids) % 90000)
                seq.decoding = True
            self.bm.commit_full_blocks(seq)
            if samples:
                done = seq.num_output_tokens >= seq.params.max_tokens
                if done:
                    self.scheduler.finish(seq)
                    del self.seqs[seq.request_id]
                changed.append((seq.request_id, 1, done))
        return changed

    def as_engine(self) -> Engine:
        return Engine(add=self.add, step=self.step, has_work=self.scheduler.has_work,
                      running=lambda: len(self.scheduler.running), abort=self.abort,
                      prefill_tokens=lambda: self.prefilled)


def simulate(pool_tokens: int, block_size: int, output_len: int, *, requests: int = 256, shape: str = "qwen3-8b",
             bandwidth_gbps: float = 3000.0, prefill_us_per_token: float = 12.0, step_overhead_ms: float = 2.0,
             max_num_batched_tokens: int = 8192, aged: str = "capacity", warmup_s: float = 45.0,
             window_s: float = 60.0, mixed: bool = False, headroom_steps: int | None = None) -> dict:
    """One simulated window run; the figures of closed_loop.drive plus preemptions and recomputed tokens.
    headroom_steps: the scheduler's admission headroom (None: the engine's default)."""
    if headroom_steps is None:
        headroom_steps = EngineConfig.model_fields["admission_headroom_steps"].default
    weights, kv = _model_bytes(shape)
    workload = Workload(vocab=151936, output_len=output_len, mixed=mixed, aged=requests)
    if aged == "capacity":
        workload = Workload(vocab=151936, output_len=output_len, mixed=mixed,
                            aged=steady_running(workload, requests, pool_tokens, block_size))
    sim = SimulatedEngine(pool_tokens, block_size, requests, max_num_batched_tokens, weights, kv,
                          bandwidth_gbps * 1e9, prefill_us_per_token * 1e-6, step_overhead_ms * 1e-3, headroom_steps)
    r = drive(sim.as_engine(), workload, requests, "window", warmup_s, window_s, clock=lambda: sim.now)
    r.pop("timeline")
    r.pop("gc_pauses")  # this process's collector, not the simulated engine's
    return r | {"preemptions": sim.scheduler.num_preemptions, "recomputed_tokens": sim.recomputed,
                "pool_tokens": pool_tokens, "block_size": block_size, "headroom_steps": headroom_steps}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool-tokens", type=int, required=True, help="the KV pool in tokens (pages x page size)")
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=8192)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--bandwidth-gbps", type=float, default=3000.0)
    ap.add_argument("--prefill-us-per-token", type=float, default=12.0)
    ap.add_argument("--aged", default="capacity", choices=("capacity", "offered"))
    ap.add_argument("--mixed", action="store_true", help="long-tailed lengths around --output-len (2k-32k)")
    ap.add_argument("--headroom-steps", type=int, help="admission headroom (default: the engine's)")
    a = ap.parse_args(argv)
    r = simulate(a.pool_tokens, a.block_size, a.output_len, requests=a.requests, bandwidth_gbps=a.bandwidth_gbps,
                 prefill_us_per_token=a.prefill_us_per_token, aged=a.aged, mixed=a.mixed,
                 headroom_steps=a.headroom_steps)
    print(json.dumps({k: r[k] for k in ("tokens_per_s", "mean_running", "preemptions", "recomputed_tokens",
                                        "headroom_steps", "workload", "steps_by_kind")}, indent=1))
    return r


if __name__ == "__main__":
    main()
