"""What rank 0's per-step command broadcast costs a tensor-parallel engine: the channel as it is
(workers/tensor_parallel.py send_commands / receive_commands: a length, then a payload only when there are
commands) against torch's broadcast_object_list (pickling every step), over gloo between processes on this
machine, for a step with no commands (the common case) and one with an add.

    python -m benchmarks.tp_command_channel [--steps 3000] [--ranks 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.provenance import write_result

ADD = [("add", "req-1", list(range(300)), None, None)]  # a request's add, as rank 0 mirrors it


def _rank(rank: int, n: int, store: str, steps: int, out: dict) -> None:
    from zipserve.workers.tensor_parallel import receive_commands, send_commands

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=n)
    ways = {
        "broadcast_object_list": (lambda c: dist.broadcast_object_list([c], src=0),
                                  lambda: (lambda box: (dist.broadcast_object_list(box, src=0), box[0])[1])([None])),
        "length_then_payload": (lambda c: send_commands(c, dist.group.WORLD), lambda: receive_commands(dist.group.WORLD)),
    }
    for way, (send, receive) in ways.items():
        for what, cmds in (("no commands", []), ("one add", ADD)):
            times = []
            for i in range(steps):
                dist.barrier()
                t = time.perf_counter()
                got = send(cmds) if rank == 0 else receive()
                times.append(time.perf_counter() - t)
                if rank and i == 0:
                    assert got == cmds, (way, got)
            if rank == 0:
                out[f"{way} / {what}"] = 1e6 * statistics.median(times)
    dist.destroy_process_group()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as m:
        out = m.dict()
        mp.spawn(_rank, args=(a.ranks, os.path.join(tmp, "store"), a.steps, out), nprocs=a.ranks)
        us = dict(out)
    for k, v in us.items():
        print(f"{k}: {v:.1f} us on rank 0 (median of {a.steps})")
    res = {"benchmark": "tp_command_channel", "ranks": a.ranks, "steps": a.steps, "us_median_rank0": us,
           "torch": torch.__version__, "cpus": os.cpu_count()}
    os.makedirs(a.out, exist_ok=True)
    write_result(os.path.join(a.out, "tp_command_channel_cpu.json"), res, indent=1)
    return res


if __name__ == "__main__":
    main()
