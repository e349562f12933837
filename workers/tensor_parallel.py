"""A tensor-parallel engine: one process per GPU, every rank running the same engine in lockstep.

Rank 0 lives in the caller's process and is the engine the rest of zipserve talks to; ranks 1..N-1 are
child processes (`python -m zipserve.workers.tensor_parallel`, so a daemonic engine process may start them too),
killed by the kernel if their parent dies. Each rank holds its shard of the weights (workers/parallel.py) and the KV of its own
heads. Before every step rank 0 broadcasts the commands it took since the last one (add, abort: a length,
then the pickled list only when there are any); every rank applies them and steps. Scheduling, page tables, compression plans and sampling are deterministic
functions of those commands and of the logits, which every rank gathers whole, so all ranks decide the
same -- compression runs per rank on its own KV heads and keeps the same count per head, so the page
tables stay identical without exchanging them (SGLang's layout: a scheduler per rank, requests from
rank 0). Commands and objects travel over a gloo group, tensors over NCCL on CUDA (gloo on CPU).

One tensor-parallel engine per process at a time (it uses torch.distributed's default group).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist

from zipserve.workers.config import EngineConfig
from zipserve.workers.engine import LLMEngine
from zipserve.workers.models import read_model_args
from zipserve.workers.parallel import TPGroup

log = logging.getLogger(__name__)


class FollowerDiedError(RuntimeError):
    """A follower rank's process exited: the engine cannot step again (its ranks hold shards of the model)."""

    def __init__(self, dead: list[str]):
        super().__init__(f"tensor-parallel rank process(es) died: {', '.join(dead)}; this engine cannot continue")


def make_engine(config: EngineConfig) -> LLMEngine:
    """The engine for a config: a plain one, or rank 0 of a tensor-parallel one."""
    return TensorParallelEngine(config) if config.tensor_parallel_size > 1 else LLMEngine(config)


def _rank_config(cfg: EngineConfig, rank: int) -> EngineConfig:
    if cfg.torch_device.type == "cuda":
        return cfg.model_copy(update={"device": f"cuda:{rank}"})
    return cfg


def _join(cfg: EngineConfig, rank: int, address: str) -> tuple[TPGroup, object]:
    """Join the group; returns the tensor group and the gloo group for commands."""
    cuda = cfg.torch_device.type == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=address, rank=rank,
                            world_size=cfg.tensor_parallel_size)
    commands = dist.new_group(backend="gloo") if cuda else dist.group.WORLD
    return TPGroup(rank, cfg.tensor_parallel_size, dist.group.WORLD), commands


_STOP = -1  # a length that is no payload: the followers exit


def send_commands(cmds: list[tuple] | None, group) -> None:
    """Rank 0: the commands taken since the last step (None: stop). A step with none, the common case, costs
    one 8-byte broadcast and no pickling; otherwise a length, then the pickled list as bytes."""
    payload = pickle.dumps(cmds) if cmds else b""
    dist.broadcast(torch.tensor([_STOP if cmds is None else len(payload)]), src=0, group=group)
    if payload:
        dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), src=0, group=group)


def receive_commands(group) -> list[tuple] | None:
    """A follower: the commands rank 0 sent for this step ([] when none; None: stop)."""
    n = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(n, src=0, group=group)
    size = int(n.item())
    if size <= 0:
        return None if size == _STOP else []
    buf = torch.empty(size, dtype=torch.uint8)
    dist.broadcast(buf, src=0, group=group)
    return pickle.loads(buf.numpy().tobytes())


def _apply(engine: LLMEngine, cmd: tuple) -> None:
    if cmd[0] == "add":
        engine.add_request(*cmd[1:])
    elif cmd[0] == "abort":
        engine.abort_request(cmd[1])


def _follower_main(cfg: EngineConfig, rank: int, address: str) -> None:
    _die_with_parent()
    tp, commands = _join(cfg, rank, address)
    engine = LLMEngine(_rank_config(cfg, rank), tp)
    code = 1
    try:
        while True:
            cmds = receive_commands(commands)
            if cmds is None:  # stop
                code = 0
                return
            for cmd in cmds:
                _apply(engine, cmd)
            engine.step()
    finally:
        # No destroy_process_group here: NCCL's teardown can wait on rank 0, which waits for this exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent exits (a rank without rank 0 would wait forever)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorParallelEngine(LLMEngine):
    """Rank 0: the LLMEngine API, with every command mirrored to the other ranks before the next step."""

    def __init__(self, config: EngineConfig):
        n = config.tensor_parallel_size
        if config.torch_device.type == "cuda" and torch.cuda.device_count() < n:
            raise ValueError(f"tensor_parallel_size {n} needs {n} GPUs; {torch.cuda.device_count()} visible")
        a, _ = read_model_args(config.model)
        for what, units in (("num_attention_heads", a.num_heads), ("num_key_value_heads", a.num_kv_heads),
                            ("intermediate_size", a.intermediate_size)):
            if units % n:
                raise ValueError(f"tensor_parallel_size {n} must divide the model's {what} ({units})")
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialized in this process: one tensor-parallel "
                               "engine per process")
        address = f"tcp://127.0.0.1:{_free_port()}"
        cfg_json = json.dumps(config.to_dict())
        entry = "import sys; from zipserve.workers.tensor_parallel import main; main(sys.argv[1:])"
        self.followers = [subprocess.Popen([sys.executable, "-c", entry, "--rank", str(r), "--address", address,
                                            "--config", cfg_json], env=dict(os.environ)) for r in range(1, n)]
        self._closed = False
        tp, self._commands = _join(config, 0, address)
        self._pending: list[tuple] = []
        try:
            super().__init__(_rank_config(config, 0), tp)
        except BaseException:
            self.shutdown()
            raise
        threading.Thread(target=self._watch_followers, name="tp-followers", daemon=True).start()
        log.info("tensor-parallel engine: %d ranks (%s), this process is rank 0", n,
                 "NCCL" if config.torch_device.type == "cuda" else "gloo")

    def add_request(self, request_id, prompt, params=None, resume_token_ids=None) -> None:
        super().add_request(request_id, prompt, params, resume_token_ids)  # raises on bad input: not mirrored
        self._pending.append(("add", request_id, prompt, params, resume_token_ids))

    def abort_request(self, request_id: str) -> bool:
        self._pending.append(("abort", request_id))
        return super().abort_request(request_id)

    def step(self):
        try:
            self._check_followers()
            cmds, self._pending = self._pending, []
            send_commands(cmds, self._commands)
            return super().step()
        except Exception as e:  # a collective broken by a dead rank: say which rank, not the transport's words
            if not isinstance(e, FollowerDiedError) and self._dead_followers(wait_s=2.0):
                raise FollowerDiedError(self._dead_followers()) from e
            raise

    def _dead_followers(self, wait_s: float = 0.0) -> list[str]:
        """The follower ranks that have exited, waiting up to wait_s for one to be reaped (a collective can
        fail on a peer's closed socket a moment before its process is gone)."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = [f"rank {r} (exit {p.returncode})" for r, p in enumerate(self.followers, 1) if p.poll() is not None]
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(0.05)

    def _check_followers(self) -> None:
        dead = self._dead_followers()
        if dead:
            raise FollowerDiedError(dead)

    def _watch_followers(self) -> None:
        """A rank that dies inside an NCCL collective leaves the others blocked in it (NCCL notices only at its
        timeout): on a follower's exit, abort the groups so that rank 0's collectives fail now and step()
        raises FollowerDiedError. (gloo, on CPU, fails at once on the closed socket.)"""
        while not self._closed:
            if self._dead_followers():
                if self.config.torch_device.type == "cuda" and not self._closed:
                    log.error("a tensor-parallel rank died: aborting the process groups")
                    from torch.distributed.distributed_c10d import _abort_process_group

                    _abort_process_group()
                return
            time.sleep(0.2)

    def shutdown(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            if all(p.poll() is None for p in self.followers):
                send_commands(None, self._commands)
            for p in self.followers:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    log.warning("tensor-parallel rank did not exit in 30 s after stop: killed")
        finally:
            for p in self.followers:
                if p.poll() is None:
                    p.kill()
            if dist.is_initialized():
                dist.destroy_process_group()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="one follower rank of a tensor-parallel engine (started by rank 0)")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--address", required=True)
    ap.add_argument("--config", required=True, help="the engine config as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = json.loads(args.config)
    _follower_main(EngineConfig.from_kwargs(cfg.pop("model"), **cfg), args.rank, args.address)


if __name__ == "__main__":
    main()
