"""vLLM's offline engine under the throughput benchmark's driver (benchmarks/closed_loop.py), in its own
process with vLLM's site packages first on PYTHONPATH (`benchmarks.throughput --systems vllm` starts it).

vLLM runs as a user would run it: its defaults (engine core in its own process, async scheduling, prefix
caching, CUDA graphs), token-id prompts, `ignore_eos`, no detokenization. What the driver cannot see
through the public API comes from vLLM's Prometheus metrics, read a few times a second: requests running
and KV-cache usage (the bandwidth floor counts the used share of its pool as the K/V a step reads).

    python -m benchmarks.vllm_engine SPEC.json OUT.json
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from benchmarks.closed_loop import Engine, Workload, drive, steady_running


class _Metrics:
    """vLLM's gauges and counters, refreshed at most every `every_s` seconds."""

    def __init__(self, llm, every_s: float = 0.25):
        self.llm, self.every_s, self.at, self.values = llm, every_s, -1.0, {}

    def get(self, name: str, default: float = 0.0) -> float:
        now = time.perf_counter()
        if now - self.at >= self.every_s:
            self.values = {m.name: m.value for m in self.llm.get_metrics() if hasattr(m, "value")}
            self.at = now
        return self.values.get(name, default)


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(spec_path) as f:
        spec = json.load(f)
    t = time.perf_counter()
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, load_format="dummy", dtype="bfloat16",
              gpu_memory_utilization=spec["gpu_memory_utilization"], max_num_seqs=spec["max_num_seqs"],
              max_model_len=spec["max_model_len"], disable_log_stats=False)
    start_s = time.perf_counter() - t
    eng = llm.llm_engine
    cache = eng.vllm_config.cache_config
    pool_tokens = cache.num_gpu_blocks * cache.block_size
    metrics = _Metrics(llm)
    seen: dict[str, int] = {}  # tokens each request has produced (vLLM's outputs are cumulative)

    def add(rid, prompt, length):
        params = SamplingParams(temperature=0, max_tokens=length, ignore_eos=True, detokenize=False)
        eng.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params)

    def step():
        out = []
        for o in eng.step():
            n = len(o.outputs[0].token_ids)
            out.append((o.request_id, n - seen.get(o.request_id, 0), o.finished))
            seen[o.request_id] = n
        return out

    def floor():
        used = metrics.get("vllm:kv_cache_usage_perc") * pool_tokens
        return (spec["weight_bytes"] + used * spec["kv_bytes_per_token"]) / spec["bandwidth"]

    # Warm-up outside the measurement: vLLM compiles and captures its graphs at start; one short run more.
    for o in llm.generate([TokensPrompt(prompt_token_ids=[7] * 300)] * 2,
                          SamplingParams(max_tokens=64, ignore_eos=True, detokenize=False), use_tqdm=False):
        pass
    preempt0 = metrics.get("vllm:num_preemptions")
    engine = Engine(add=add, step=step, has_work=eng.has_unfinished_requests,
                    running=lambda: int(metrics.get("vllm:num_requests_running")), step_floor_s=floor,
                    abort=lambda rid: eng.abort_request([rid]))
    workload = Workload(**spec["workload"])
    if workload.aged and spec.get("age_to_capacity"):
        workload = dataclasses.replace(workload, aged=steady_running(workload, spec["concurrency"], pool_tokens,
                                                                     cache.block_size))
    result = drive(engine, workload, spec["concurrency"], spec["mode"], spec["warmup_s"], spec["window_s"],
                   spec["max_seconds"])
    metrics.at = -1.0
    import vllm

    result |= {"system": "vLLM", "version": vllm.__version__, "start_s": start_s, "kv_pool_tokens": pool_tokens,
               "preemptions": int(metrics.get("vllm:num_preemptions") - preempt0),
               "note": "running and the floor's K/V bytes from vLLM's metrics, sampled every 0.25 s; gc_pauses are "
                       "this front-end process's only (vLLM's engine core runs in a process of its own)"}
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
