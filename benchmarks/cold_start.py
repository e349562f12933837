"""First-burst latency of a fresh engine: how long bursts of new requests take, the first of each size and
a repeat, and which Triton kernels compile during each (a fresh Triton cache per system).

A kernel compiled while requests wait is time-to-first-token a user pays; this shows where it happens.
Needs CUDA.

    python -m benchmarks.cold_start [--shape qwen3-8b] [--systems compressed,full] [--bursts 32,128,32,256]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from benchmarks.provenance import commit, write_result


def _kernels(cache_dir: str) -> set[str]:
    """Names of the compiled kernels in a Triton cache folder (one json of metadata per compile)."""
    names = set()
    for path in glob.glob(os.path.join(cache_dir, "*", "*.json")):
        if os.path.basename(path).startswith("__grp__"):
            continue
        names.add(os.path.relpath(path, cache_dir))
    return names


def run_system(system: str, model_dir: str, bursts: list[int], max_tokens: int) -> dict:
    cache = tempfile.mkdtemp(prefix=f"triton-{system}-")
    os.environ["TRITON_CACHE_DIR"] = cache  # read at compile time: this process compiles from scratch
    from zipserve.workers import LLM, SamplingParams

    engine = {"load_format": "dummy"} | ({"budget_blocks": None} if system == "full" else {})
    t = time.perf_counter()
    llm = LLM(config_file="configs/engine/qwen3-8b-h100.yaml", model=model_dir, **engine)
    res = {"start_s": time.perf_counter() - t, "kernels_at_start": len(_kernels(cache)), "bursts": []}
    seen = _kernels(cache)
    rng = random.Random(0)
    for n in bursts:
        prompts = [[rng.randrange(1000, 20000) for _ in range(rng.randrange(100, 500))] for _ in range(n)]
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0), use_tqdm=False)
        wall = time.perf_counter() - t
        now = _kernels(cache)
        new = sorted(os.path.basename(k)[:-5] for k in now - seen)
        seen = now
        res["bursts"].append({"requests": n, "wall_s": wall, "compiled": len(new), "kernels": new})
        print(f"{system}: burst {n}: {wall:.2f} s, {len(new)} kernels compiled {new}", flush=True)
    return res


def main(argv=None) -> int:
    from benchmarks.decode_step import config_folder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--systems", default="compressed,full")
    ap.add_argument("--bursts", default="32,128,32,256")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--system", default=None, help=argparse.SUPPRESS)  # one system in a child process
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    bursts = [int(x) for x in a.bursts.split(",")]
    if a.system:
        print("RESULT " + json.dumps(run_system(a.system, config_folder(a.shape), bursts, a.max_tokens)))
        return 0
    res = {"benchmark": "cold_start", "shape": a.shape, "bursts": bursts, "max_tokens": a.max_tokens,
           "commit": commit(),
           "command": "python -m benchmarks.cold_start " + " ".join(sys.argv[1:]), "systems": {}}
    for system in a.systems.split(","):  # each in a fresh process: nothing compiled or cached carries over
        out = subprocess.run([sys.executable, "-m", "benchmarks.cold_start", "--system", system, "--shape", a.shape,
                              "--bursts", a.bursts, "--max-tokens", str(a.max_tokens)],
                             capture_output=True, text=True)
        sys.stderr.write(out.stderr[-3000:])
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        print("\n".join(x for x in out.stdout.splitlines() if not x.startswith("RESULT ")))
        res["systems"][system] = json.loads(lines[-1][7:]) if lines else {"error": out.stderr[-2000:]}
    import torch

    res["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    from benchmarks.decode_step import card_tag

    os.makedirs(a.out, exist_ok=True)
    write_result(os.path.join(a.out, f"cold_start_{card_tag(res['device'])}.json"), res, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
