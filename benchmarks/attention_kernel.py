"""The decode attention kernel alone against its memory floor, with a sweep of its launch parameters.

B requests each hold a `context`-token cache in pages (random K/V, pages shuffled as in a busy pool);
one decode launch (one query row per request) reads all of it. The floor is the K/V bytes over the
card's measured copy bandwidth. `--sweep` times every combination of key tile, warps, pipeline stages
and the smallest KV partition; the kernel's grid hint is the engine's under CUDA graphs
(max_kv_len = max_model_len) unless `--hint actual`. Needs CUDA.

    python -m benchmarks.attention_kernel [--batch 256] [--contexts 1024,2048] [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch

from zipserve.kernels import paged_attention as pa
from benchmarks.provenance import commit, write_result


def make_case(batch: int, context: int, block_size: int, h_kv: int, g: int, d: int, device, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pages = -(-context // block_size)
    k = torch.randn(batch * pages + 1, block_size, h_kv, d, dtype=torch.bfloat16, device=device)
    v = torch.randn_like(k)
    tables = torch.randperm(batch * pages, generator=gen).view(batch, pages).to(device=device, dtype=torch.int32)
    q = torch.randn(batch, h_kv * g, d, dtype=torch.bfloat16, device=device)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
    kv_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return q, k, v, tables, qsl, kv_lens


def time_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def run_config(case, hint: int, decode_n: int, warps: int, stages: int, min_part: int) -> float:
    """Milliseconds of one decode launch with these parameters (the module's defaults are restored after)."""
    base = pa._config(case[0].device)
    saved = pa._config, pa._MIN_PARTITION
    cfg = pa._Config(base.prefill_m, base.prefill_n, base.prefill_warps, decode_n, warps, stages, base.programs)
    pa._config, pa._MIN_PARTITION = (lambda device: cfg), min_part
    try:
        q, k, v, tables, qsl, kv_lens = case
        scale = q.shape[-1] ** -0.5
        return time_ms(lambda: pa.paged_attention_triton(q, k, v, tables, qsl, kv_lens, scale, max_query_len=1,
                                                         max_kv_len=hint))
    finally:
        pa._config, pa._MIN_PARTITION = saved


def main(argv=None) -> int:
    from benchmarks.decode_step import card_tag, copy_bandwidth

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--contexts", default="1024,2048")
    ap.add_argument("--max-model-len", type=int, default=40960, help="the grid hint under CUDA graphs")
    ap.add_argument("--hint", choices=("max_model_len", "actual"), default="max_model_len")
    ap.add_argument("--heads", default="8,4,128", help="KV heads, GQA group, head dim (Qwen3-8B)")
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    h_kv, g, d = (int(x) for x in a.heads.split(","))
    bw = copy_bandwidth(dev)
    base = pa._config(dev)
    default = (base.decode_n, base.decode_warps, base.stages, pa._MIN_PARTITION)
    grid = list(itertools.product((32, 64, 128), (4, 8), (2, 3, 4), (256, 512, 1024))) if a.sweep else []
    if default not in grid:
        grid.insert(0, default)
    rows = []
    for ctx in (int(c) for c in a.contexts.split(",")):
        case = make_case(a.batch, ctx, a.block_size, h_kv, g, d, dev)
        floor_ms = 2 * a.batch * ctx * h_kv * d * 2 / bw * 1e3  # K and V bf16, read once, at copy bandwidth
        hint = a.max_model_len if a.hint == "max_model_len" else ctx
        for n, w, s, p in grid:
            try:
                ms = run_config(case, hint, n, w, s, p)
            except Exception as e:  # noqa: BLE001 -- e.g. shared memory exceeded: record and go on
                rows.append(dict(context=ctx, decode_n=n, warps=w, stages=s, min_partition=p, error=str(e)[:200]))
                continue
            rows.append(dict(context=ctx, decode_n=n, warps=w, stages=s, min_partition=p, ms=ms, floor_ms=floor_ms,
                             fraction_of_floor=floor_ms / ms, default=(n, w, s, p) == default))
            print(f"ctx {ctx} n{n} w{w} s{s} p{p}: {ms:.3f} ms ({floor_ms / ms:.0%} of floor)", flush=True)
        del case
        torch.cuda.empty_cache()
    best = {}
    for r in rows:
        if "ms" in r and (r["context"] not in best or r["ms"] < best[r["context"]]["ms"]):
            best[r["context"]] = r
    res = dict(benchmark="attention_kernel", device=torch.cuda.get_device_name(), batch=a.batch, heads=a.heads,
               block_size=a.block_size, hint=a.hint, max_model_len=a.max_model_len, copy_bandwidth_GBps=bw / 1e9,
               default=dict(zip(("decode_n", "warps", "stages", "min_partition"), default)), rows=rows,
               best=best, commit=commit(), torch=torch.__version__, command="python -m benchmarks.attention_kernel "
               + " ".join(argv if argv is not None else __import__("sys").argv[1:]))
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"attention_kernel_{card_tag(res['device'])}.json")
    write_result(path, res, indent=1)
    for ctx, r in best.items():
        print(f"best at ctx {ctx}: n{r['decode_n']} w{r['warps']} s{r['stages']} p{r['min_partition']} "
              f"{r['ms']:.3f} ms ({r['fraction_of_floor']:.0%} of floor)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
