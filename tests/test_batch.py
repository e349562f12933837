"""Batch inference (cluster/batch.py) on CPU: outputs equal LLM.generate, a killed engine actor costs no
row, resume after an interruption, bad rows reported, the actor pool grows with the backlog."""

import json
import os
import signal
import threading
import time

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.data")

from zipserve.cluster.batch import run  # noqa: E402
from zipserve.workers import LLM, SamplingParams  # noqa: E402

ENGINE = {"block_size": 16, "num_blocks": 512, "max_model_len": 256, "max_num_seqs": 32, "budget_blocks": 4,
          "compression": {"query_window": 8}}


@pytest.fixture(scope="module")
def ray_session(local_ray):
    """Three CPUs: up to three engine actors of one CPU each (the pool-growth test)."""
    with local_ray(num_cpus=3):
        yield


def _rows(n, seed=0):
    import random

    rng = random.Random(seed)
    return [{"id": f"r{i}", "prompt": [rng.randrange(3, 300) for _ in range(rng.randint(5, 40))],
             "max_tokens": rng.randint(4, 24), "temperature": 0, "ignore_eos": True} for i in range(n)]


def _write(path, rows, extra_lines=()):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


def _expected(path, rows):
    llm = LLM(path, **ENGINE)
    outs = llm.generate([r["prompt"] for r in rows],
                        [SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True) for r in rows],
                        use_tqdm=False)
    return {r["id"]: o.token_ids for r, o in zip(rows, outs)}


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_200_rows_equal_llm_generate_and_bad_rows_reported(ray_session, qwen3_path, tmp_path):
    rows = _rows(200)
    bad = ['{"id": "x1", "prompt": "unterminated', json.dumps({"prompt": [5, 6]}),
           json.dumps({"id": "x3", "prompt": [5], "temperature": -2}), json.dumps({"id": "x4"}),
           json.dumps({"id": "r0", "prompt": [5]}), json.dumps({"id": "x6", "prompt": [5], "colour": "red"})]
    _write(tmp_path / "in.jsonl", rows, bad)
    # Both actors up before rows flow (else, on a loaded machine, the first can serve every row before the
    # second has loaded its engine, and the two-actor path goes untested).
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before, ctx.wait_for_min_actors_s = ctx.wait_for_min_actors_s, 600
    try:
        summary = run(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), model=qwen3_path, engine=ENGINE,
                      min_workers=2, max_workers=2, num_cpus=1, batch_size=16, progress=False)
    finally:
        ctx.wait_for_min_actors_s = before
    out = _read(tmp_path / "out.jsonl")
    assert summary["output_rows"] == 200 == len(out) and summary["errors"] == 6
    want = _expected(qwen3_path, rows)
    assert {o["id"]: o["choices"][0]["token_ids"] for o in out} == want
    errors = _read(tmp_path / "out.jsonl.errors.jsonl")
    reasons = " | ".join(e["error"] for e in errors)
    for needle in ("malformed JSON", "missing id", "temperature", "exactly one of prompt or messages",
                   "duplicate id", "unknown field"):
        assert needle in reasons, reasons
    assert summary["workers"] == 2


def test_killed_engine_actor_loses_and_duplicates_nothing(ray_session, qwen3_path, tmp_path):
    rows = _rows(200, seed=1)
    _write(tmp_path / "in.jsonl", rows)
    shard_dir = str(tmp_path / "out.jsonl") + ".shards"
    killed = []

    def killer():  # kill the first engine actor seen in the output, once its first shard lands
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if os.path.isdir(shard_dir):
                for name in os.listdir(shard_dir):
                    if name.endswith(".jsonl"):
                        with open(os.path.join(shard_dir, name)) as f:
                            worker = json.loads(f.readline())["worker"]
                        pid = int(worker.rsplit(":", 1)[1])
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                        return
            time.sleep(0.05)

    t = threading.Thread(target=killer)
    t.start()
    summary = run(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), model=qwen3_path, engine=ENGINE,
                  min_workers=2, max_workers=2, num_cpus=1, batch_size=8, progress=False)
    t.join()
    assert killed, "no engine actor was killed"
    out = _read(tmp_path / "out.jsonl")
    assert len(out) == 200 and len({o["id"] for o in out}) == 200 and summary["output_rows"] == 200
    assert {o["id"]: o["choices"][0]["token_ids"] for o in out} == _expected(qwen3_path, rows)


def test_resume_after_interruption(ray_session, qwen3_path, tmp_path):
    rows = _rows(60, seed=2)
    _write(tmp_path / "in.jsonl", rows)
    # An interrupted run: 25 rows merged into OUTPUT, 10 more in a shard, and a half-written temp file.
    want = _expected(qwen3_path, rows)
    done = [{"id": r["id"], "choices": [{"index": 0, "text": "", "token_ids": want[r["id"]], "finish_reason": "length"}],
             "prompt_tokens": len(r["prompt"]), "completion_tokens": len(want[r["id"]]), "worker": "earlier"}
            for r in rows[:35]]
    _write(tmp_path / "out.jsonl", done[:25])
    os.makedirs(str(tmp_path / "out.jsonl") + ".shards")
    _write(tmp_path / "out.jsonl.shards" / "1-a.jsonl", done[25:35])
    with open(tmp_path / "out.jsonl.shards" / ".tmp-deadbeef", "w") as f:
        f.write('{"id": "r40", "choi')
    summary = run(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), model=qwen3_path, engine=ENGINE,
                  min_workers=1, max_workers=1, progress=False)
    assert summary["skipped_done"] == 35 and summary["rows"] == 25
    out = _read(tmp_path / "out.jsonl")
    assert sorted(o["id"] for o in out) == sorted(r["id"] for r in rows)  # no duplicates, nothing missing
    assert {o["id"]: o["choices"][0]["token_ids"] for o in out} == want
    assert sum(o["worker"] == "earlier" for o in out) == 35


def test_actor_pool_grows_with_the_backlog_and_shrinks_when_idle(ray_session, qwen3_path, tmp_path):
    # Enough backlog to outlast actor start-up, then a long tail: the last rows generate 16 x 200 tokens each
    # (two waves of the engine's 32 slots), so the other actors sit idle for seconds while they finish. (With
    # n=8, one wave, the tail took ~1 s on an unloaded 2-core machine: the job ended before the pool shrank.)
    rows = [dict(r, max_tokens=64) for r in _rows(160, seed=3)]
    rows[-4:] = [dict(r, max_tokens=200, n=16) for r in rows[-4:]]
    _write(tmp_path / "in.jsonl", rows)
    summary = run(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), model=qwen3_path, engine=ENGINE,
                  min_workers=1, max_workers=3, num_cpus=1, batch_size=4, progress=False)
    assert summary["output_rows"] == 160
    assert [len(o["choices"]) for o in _read(tmp_path / "out.jsonl") if o["id"] in {r["id"] for r in rows[-4:]}] == [16] * 4
    assert summary["workers"] > 1, "the pool never grew beyond its minimum"
    assert summary["compressions"] > 0  # 200-token rows overflow the 4 x 16 budget
    sizes = [n for _, n in summary["pool_sizes"]]
    peak = sizes.index(max(sizes))
    # Shrunk while the job still ran: fewer actors, but not yet none (the job's end removes them all).
    assert max(sizes) > 1 and any(0 < n < max(sizes) for n in sizes[peak:]), \
        f"the pool never shrank while working: {summary['pool_sizes']}"
