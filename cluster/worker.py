"""The GPU worker as a Ray Serve deployment: one replica = one actor = one engine (one GPU, or CPU).

The ingress calls `generate` through a streaming handle; the router (scheduler/router.py) reads the
`route` keyword to pick the replica. The tokens go back over the ingress's multiplexed stream
(`subscribe`, cluster/channel.py), one message per flush for all of its requests; the request's own call
carries its lifetime and aborts the request when the caller goes away (Serve cancels the generator), which
frees its pages at the next step. State for the router comes from `record_routing_stats`, for the autoscaler from
`record_autoscaling_stats`; `check_health` fails when the engine loop died or stopped making progress.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid

from ray import serve

from zipserve.cluster.channel import WorkerChannel
from zipserve.scheduler.state_board import capacity_of
from zipserve.workers.async_engine import AsyncEngine
from zipserve.workers.config import EngineConfig
from zipserve.cluster.worker_metrics import WorkerMetrics
from zipserve.workers.sampling_params import SamplingParams

log = logging.getLogger("zipserve.worker")


def _rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process (Linux), for soak tests and operators."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class EngineWorker:
    """Deployment body (wrapped with `serve.deployment` by cluster/app.py, which sets resources, router
    and autoscaling from the app config)."""

    def __init__(self, engine_config: dict, stall_timeout_s: float = 120.0, stream_interval_s: float = 0.05,
                 engine_process: bool = True, stream_events_per_s: float = 4000.0, max_stream_interval_s: float = 0.2,
                 orphan_timeout_s: float = 60.0, subscription_idle_s: float = 5.0):
        cfg = dict(engine_config)
        model = cfg.pop("model")
        config_file = cfg.pop("config_file", None)
        self.config = (EngineConfig.from_yaml(config_file, model=model, **cfg) if config_file
                       else EngineConfig.from_kwargs(model, **cfg))
        # The step loop in its own process: this replica's event loop (streaming, metrics) would otherwise
        # share the GIL with it and slow every step (see workers/async_engine.py).
        self.engine = AsyncEngine(self.config, separate_process=engine_process)
        self.stall_timeout_s = stall_timeout_s
        self.stream_interval_s = stream_interval_s  # direct streams (handle callers without a channel)
        # Multiplexed streams (cluster/channel.py): flush interval = open streams / events_per_s, capped.
        self.stream_events_per_s, self.max_stream_interval_s = stream_events_per_s, max_stream_interval_s
        self.orphan_timeout_s, self.subscription_idle_s = orphan_timeout_s, subscription_idle_s
        self.channels: dict[str, WorkerChannel] = {}
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id if ctx is not None else "local"
        self.metrics = WorkerMetrics(self.replica)
        f = self.engine.facts
        log.info("worker %s ready: %s, %d pages of %d tokens, budget %s, max_model_len %d, engine %s",
                 self.replica, self.config.model, f["num_blocks"], self.config.block_size, self.config.budget_blocks,
                 f["max_model_len"], f"process {self.engine.pid}" if engine_process else "thread")

    def model_info(self) -> dict:
        f = self.engine.facts
        return {"max_model_len": f["max_model_len"], "block_size": self.config.block_size,
                "budget_blocks": self.config.budget_blocks, "vocab_size": f["vocab_size"],
                "total_pages": f["num_blocks"], "max_num_seqs": self.config.max_num_seqs,
                "recall_pages": f["engine_recall_pages"]}

    async def generate(self, request: dict, route: dict | None = None):
        """request: {"prompt_token_ids", "params" (SamplingParams fields), "n", "request_id",
        "resume_token_ids" (output already streamed by a worker that died), "channel" (optional)}.

        Without a channel, yields {"rid", "index", "token_ids", "text", "finish_reason", "prompt_tokens",
        "completion_tokens", "cached_tokens", "stop_reason"} per sample and step (merged per
        stream_interval_s); the first and last carry "worker_state". With a channel (an ingress replica's
        id, cluster/channel.py), those chunks go to that ingress's multiplexed stream instead, and this
        call yields one item, {"replica"}, at admission, and ends when every sample has finished."""
        params = SamplingParams(**request.get("params", {}))
        rid = request.get("request_id") or uuid.uuid4().hex
        n = int(request.get("n", 1))
        channel = self._channel(request["channel"]) if request.get("channel") else None
        t0 = time.monotonic()
        first = last = None
        status = "aborted"
        if channel is not None:
            channel.open_streams += 1
        try:
            async for i, out in self.engine.generate(rid, request["prompt_token_ids"], params, n,
                                                     request.get("resume_token_ids"),
                                                     0.0 if channel is not None else self.stream_interval_s):
                if out.finish_reason == "error":
                    raise RuntimeError(f"request {out.request_id} failed in the engine: {out.stop_reason}")
                now = time.monotonic()
                admitted = first is None
                if first is None:
                    first = now
                    self.metrics.ttft.observe(now - t0)
                elif out.new_token_ids:  # a message may carry several tokens: observe the mean gap per token
                    self.metrics.itl.observe((now - last) / len(out.new_token_ids))
                last = now
                self.metrics.tokens.inc(len(out.new_token_ids))
                chunk = {"rid": rid, "index": i, "token_ids": list(out.new_token_ids), "text": out.new_text,
                         "finish_reason": out.finish_reason, "prompt_tokens": out.num_prompt_tokens,
                         "completion_tokens": len(out.token_ids), "cached_tokens": out.num_cached_tokens,
                         "stop_reason": out.stop_reason if out.finished else None}
                if out.logprobs is not None:  # {token: logprob}, sampled first, per new token
                    k = len(out.new_token_ids)
                    chunk["logprobs"] = list(out.logprobs[len(out.logprobs) - k:]) if k else []
                if out.prompt_logprobs is not None:  # once, with the first token
                    chunk["prompt_logprobs"] = out.prompt_logprobs
                if admitted or out.finished:  # admitted or finished: capacity jumped (scheduler/state_board.py)
                    chunk["worker_state"] = {"replica": self.replica,
                                             **capacity_of(self.engine.snapshot["routing"])}
                if channel is None:
                    yield chunk
                    continue
                if channel.orphaned_for() > self.orphan_timeout_s:
                    raise RuntimeError(f"no ingress has read this request's stream for {self.orphan_timeout_s:.0f} s")
                channel.put(chunk)
                if admitted:
                    yield {"replica": self.replica}
            status = "ok"
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except ValueError:
            status = "rejected"
            raise
        except Exception:
            status = "error"
            raise
        finally:
            if channel is not None:
                channel.open_streams -= 1
                if status != "ok":  # nobody will read this request's untaken chunks: they must not orphan the channel
                    channel.drop(rid)
            self.metrics.requests.inc(tags={"status": status})

    async def subscribe(self, ingress_id: str, route: dict | None = None):
        """The multiplexed stream of one ingress replica's chunks (cluster/channel.py); `route` pins the
        call to this replica (scheduler/router.py)."""
        async for batch in self._channel(ingress_id).serve(self.stream_events_per_s, self.max_stream_interval_s,
                                                           self.subscription_idle_s):
            yield batch

    def _channel(self, ingress_id: str) -> WorkerChannel:
        ch = self.channels.get(ingress_id)
        if ch is None:
            ch = self.channels[ingress_id] = WorkerChannel()
        return ch

    def record_routing_stats(self) -> dict:
        snap = self.engine.snapshot
        state = dict(snap["routing"])
        state["healthy"] = self._healthy()
        self.metrics.publish(snap["stats"])
        return state

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom metrics for cluster/autoscaling.py: page pressure and queue, per replica."""
        s = self.engine.snapshot["stats"]
        slots_total = s.get("slots_total") or s["max_num_seqs"]
        return {"page_pressure": s["used_pages"] / max(1, s["total_pages"]),
                "slot_pressure": s["running"] / max(1, min(slots_total, s["max_num_seqs"])),
                "waiting": float(s["waiting"])}

    def stats(self) -> dict:
        import ray

        return dict(self.engine.snapshot["stats"], healthy=self._healthy(), replica=self.replica,
                    node=ray.get_runtime_context().get_node_id(), rss_bytes=_rss_bytes() + (_rss_bytes(self.engine.pid) if self.engine.pid else 0))

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError(f"engine loop is dead: {self.engine.error!r}")
        if not self._healthy():
            raise RuntimeError(f"engine loop made no progress for {self.stall_timeout_s:.0f} s with work pending")

    def _healthy(self) -> bool:
        if not self.engine.alive:
            return False
        return time.monotonic() - self.engine.last_step_time < self.stall_timeout_s

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
