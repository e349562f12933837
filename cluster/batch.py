"""Batch inference on the cluster: JSONL in, JSONL out, over an autoscaling pool of engine actors (Ray Data).

    zipserve batch INPUT.jsonl OUTPUT.jsonl [--config app.yaml] [--min-workers 1 --max-workers 4]
    cluster.batch.run(input, output, config=..., min_workers=..., max_workers=...)

Each input line: {"id": ..., "prompt": "..." | [token ids], or "messages": [...], optional sampling fields
(max_tokens, temperature, top_p, top_k, min_p, seed, stop, stop_token_ids, ignore_eos), optional "n"}.
Each output line: {"id", "choices": [{"index", "text", "token_ids", "finish_reason"}], "prompt_tokens",
"completion_tokens", "worker"}.

- Bad rows (malformed JSON, no id / duplicate id, no prompt, invalid parameters, too long) go to
  OUTPUT.errors.jsonl with the reason; the job goes on. Rows are parsed and validated on the driver (Ray
  Data's read_json would fail the whole job on one malformed line).
- Results land in shards under OUTPUT.shards/, each written to a temporary file and renamed, so a crash
  never leaves a half line; at the end the shards are merged into OUTPUT (also by rename).
- Rerunning with the same OUTPUT skips every id already written (in OUTPUT or its shards).
- Engine actors are a Ray Data ActorPoolStrategy(min_size, max_size) pool: it grows with the backlog and
  shrinks as actors go idle once the inputs are consumed (the summary's pool_sizes records both, read from
  the GCS actor table); restartable: a batch whose actor dies is retried on another, so a lost worker costs only its in-flight
  rows and no row is lost or written twice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Annotated, Any, ClassVar

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      ValidationInfo, create_model, model_validator)
from pydantic_core import PydanticCustomError

from zipserve.workers.config_model import ConfigModel, error_summary
from zipserve.workers.sampling_params import SamplingParams

log = logging.getLogger("zipserve.batch")

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                   "ignore_eos", "include_stop_str_in_output")
MAX_N = 16  # samples per row
TokenId = Annotated[int, Field(ge=0)]
# Text or token ids, told apart by type so an error names the one meant.
Prompt = Annotated[Annotated[str, Field(min_length=1), Tag("text")]
                   | Annotated[list[TokenId], Field(min_length=1), Tag("token ids")],
                   Discriminator(lambda v: "text" if isinstance(v, str) else "token ids")]


class ChatTurn(BaseModel):
    """A row's chat message: role and content strings; other keys reach the chat template as given."""
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    role: str
    content: str


def _row_id(v) -> str:
    if v is None or isinstance(v, bool) or not isinstance(v, (str, int)):
        raise PydanticCustomError("missing_id", "missing id (a string or integer)")
    return str(v)


class _Row(ConfigModel):
    key_kind: ClassVar[str] = "field"

    id: Annotated[str, BeforeValidator(_row_id)] = Field(None, validate_default=True)
    # Absent (None) unless given; a given null is refused like any other bad value.
    prompt: Prompt = None
    messages: list[ChatTurn] = Field(None, min_length=1)
    n: int = Field(1, ge=1, le=MAX_N)

    @model_validator(mode="after")
    def _one_prompt_and_valid_params(self, info: ValidationInfo):
        """max_model_len, when the validation context has it, bounds max_tokens."""
        if ("prompt" in self.model_fields_set) == ("messages" in self.model_fields_set):
            raise ValueError("give exactly one of prompt or messages")
        params = SamplingParams(**self.sampling_params())  # raises ValueError naming the bad field
        max_model_len = (info.context or {}).get("max_model_len")
        if max_model_len is not None and params.max_tokens >= max_model_len:
            raise ValueError(f"max_tokens must be < max_model_len ({max_model_len})")
        return self

    def sampling_params(self) -> dict:
        """The row's SamplingParams fields, as given."""
        return self.model_dump(include=set(SAMPLING_FIELDS), exclude_unset=True)


# The sampling fields are SamplingParams' (workers/sampling_params.py), which checks them.
BatchRow = create_model("BatchRow", __base__=_Row, **{name: (Any, None) for name in SAMPLING_FIELDS})


def read_rows(path: str, done: set[str], max_model_len: int | None = None) -> tuple[list[dict], list[dict]]:
    """(good rows not yet done, errors). Every row gets a reason if it is refused."""
    good, errors, seen = [], [], set()
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append({"line": lineno, "id": None, "error": f"malformed JSON: {e}"})
                continue
            rid = raw.get("id") if isinstance(raw, dict) else None
            rid = rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None
            try:
                row = BatchRow.model_validate(raw, context={"max_model_len": max_model_len})
                if row.id in seen:
                    raise ValueError(f"duplicate id {row.id!r}")
            except ValidationError as e:
                errors.append({"line": lineno, "id": rid, "error": error_summary(e)})
                continue
            except (ValueError, TypeError) as e:
                errors.append({"line": lineno, "id": rid, "error": str(e)})
                continue
            seen.add(row.id)
            if row.id not in done:
                good.append({"id": row.id, "request": row.model_dump_json(exclude_unset=True)})
    return good, errors


def written_ids(output: str) -> set[str]:
    """Ids already in OUTPUT and its shards (a resumed run skips them)."""
    ids = set()
    files = [output] if os.path.isfile(output) else []
    shard_dir = output + ".shards"
    if os.path.isdir(shard_dir):
        files += [os.path.join(shard_dir, f) for f in sorted(os.listdir(shard_dir)) if f.endswith(".jsonl")]
    for path in files:
        with open(path) as f:
            for line in f:
                if line.endswith("\n"):
                    ids.add(str(json.loads(line)["id"]))
    return ids


class BatchEngine:
    """A Ray Data actor: one engine; runs a batch of rows with continuous batching."""

    def __init__(self, engine_config: dict):
        from zipserve.workers import LLM

        cfg = dict(engine_config)
        model = cfg.pop("model")
        config_file = cfg.pop("config_file", None)
        self.llm = LLM(model, config_file=config_file, **cfg)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        rows = [BatchRow.model_validate_json(r) for r in batch["request"]]
        tok = self.llm.tokenizer
        prompts, params, owners = [], [], []
        for i, row in enumerate(rows):
            if row.messages is not None:
                chat = [m.model_dump() for m in row.messages]
                prompt = tok.encode(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
                                    add_special_tokens=False)
            else:
                prompt = row.prompt
            p = row.sampling_params()
            for j in range(row.n):
                sp = dict(p)
                if row.n > 1 and sp.get("seed") is not None:
                    sp["seed"] += j
                prompts.append(prompt)
                params.append(SamplingParams(**sp))
                owners.append((i, j))
        before = self.llm.engine.stats().get("compressions", 0)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        compressions = self.llm.engine.stats().get("compressions", 0) - before
        results = [{"id": r.id, "choices": [], "prompt_tokens": 0, "completion_tokens": 0, "worker": self.worker}
                   for r in rows]
        for (i, j), o in zip(owners, outs):
            res = results[i]
            res["choices"].append({"index": j, "text": o.text, "token_ids": list(o.token_ids),
                                   "finish_reason": o.finish_reason})
            res["prompt_tokens"] = o.num_prompt_tokens
            res["completion_tokens"] += len(o.token_ids)
        # The batch's compressions ride on its first row (the driver sums the column).
        return {"id": [r["id"] for r in results], "result": [json.dumps(r) for r in results],
                "tokens": [r["completion_tokens"] for r in results],
                "compressions": [compressions] + [0] * (len(results) - 1)}


def engine_actors_alive(job_id: str) -> int:
    """Engine actors of this job alive now, from the GCS actor table (no dashboard needed)."""
    from ray._private import state

    return sum(1 for a in state.actors().values()
               if a.get("JobID") == job_id and "BatchEngine" in (a.get("ActorClassName") or "")
               and a.get("State") == "ALIVE")


def _write_shard(shard_dir: str, lines: list[str]) -> None:
    tmp = os.path.join(shard_dir, f".tmp-{uuid.uuid4().hex}")
    with open(tmp, "w") as f:
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(shard_dir, f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.jsonl"))


def _merge(output: str) -> int:
    shard_dir = output + ".shards"
    tmp = output + ".tmp"
    n = 0
    with open(tmp, "w") as out:
        if os.path.isfile(output):
            with open(output) as f:
                for line in f:
                    if line.endswith("\n"):
                        out.write(line)
                        n += 1
        if os.path.isdir(shard_dir):
            for name in sorted(os.listdir(shard_dir)):
                if name.endswith(".jsonl"):
                    with open(os.path.join(shard_dir, name)) as f:
                        for line in f:
                            out.write(line)
                            n += 1
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, output)
    if os.path.isdir(shard_dir):
        for name in os.listdir(shard_dir):
            os.remove(os.path.join(shard_dir, name))
        os.rmdir(shard_dir)
    return n


def run(input_path: str, output_path: str, *, model: str | None = None, engine: dict | None = None,
        engine_config: str | None = None, min_workers: int = 1, max_workers: int = 1, num_gpus: float = 0,
        num_cpus: float = 1, batch_size: int = 16, progress: bool = True) -> dict:
    """Run (or resume) a batch job; returns the summary (also logged)."""
    import ray
    from tqdm import tqdm

    from zipserve.cluster.app import gpus_per_engine, load_app_config

    app, resolved_engine = load_app_config({"model": model, "engine": engine or {}, "engine_config": engine_config})
    engine_cfg = dict(app.engine, model=app.model)
    if app.engine_config:
        engine_cfg["config_file"] = app.engine_config
    if not 1 <= min_workers <= max_workers:
        raise ValueError(f"need 1 <= min_workers ({min_workers}) <= max_workers ({max_workers})")
    done = written_ids(output_path)
    rows, errors = read_rows(input_path, done)
    if errors:
        with open(output_path + ".errors.jsonl", "w") as f:
            f.write("".join(json.dumps(e) + "\n" for e in errors))
        log.warning("%d bad row(s) -> %s", len(errors), output_path + ".errors.jsonl")
    summary = {"rows": len(rows), "skipped_done": len(done), "errors": len(errors), "completion_tokens": 0,
               "compressions": 0, "workers": 0, "peak_pool": 0, "pool_sizes": []}
    t0 = time.time()
    if rows:
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
        import ray.data

        shard_dir = output_path + ".shards"
        os.makedirs(shard_dir, exist_ok=True)
        ds = ray.data.from_items(rows).repartition(max(1, -(-len(rows) // batch_size)))
        out = ds.map_batches(
            BatchEngine, fn_constructor_kwargs={"engine_config": engine_cfg}, batch_size=batch_size,
            batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=min_workers, max_size=max_workers),
            num_gpus=gpus_per_engine(num_gpus, resolved_engine.to_dict()), num_cpus=num_cpus, max_restarts=-1,
            max_task_retries=-1)
        bar = tqdm(total=len(rows), unit="req", disable=not progress, desc="zipserve batch")
        written, workers = set(), set()
        job_id = ray.get_runtime_context().get_job_id()
        pool = summary["pool_sizes"]  # [seconds, alive engine actors] at each change: the pool growing and shrinking

        def watch_pool():
            alive = engine_actors_alive(job_id)
            if not pool or pool[-1][1] != alive:
                pool.append([round(time.time() - t0, 2), alive])
                log.info("engine actor pool: %d alive", alive)

        def watch_until_stopped():
            while not stop.wait(0.25):
                watch_pool()

        stop = threading.Event()
        watcher = threading.Thread(target=watch_until_stopped, daemon=True, name="zipserve-batch-pool")
        watcher.start()
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            lines = [r + "\n" for i, r in zip(batch["id"], batch["result"]) if str(i) not in written]
            written.update(str(i) for i in batch["id"])
            new_workers = {json.loads(r)["worker"] for r in batch["result"]} - workers
            if new_workers:
                workers |= new_workers
                log.info("engine actors serving: %d (%s)", len(workers), ", ".join(sorted(new_workers)))
            if lines:
                _write_shard(shard_dir, lines)
            summary["completion_tokens"] += int(sum(batch["tokens"]))
            summary["compressions"] += int(sum(batch["compressions"]))
            bar.update(len(lines))
            elapsed = time.time() - t0
            bar.set_postfix(tok_s=f"{summary['completion_tokens'] / max(elapsed, 1e-9):.0f}")
        bar.close()
        stop.set()
        watcher.join()
        watch_pool()
        summary["workers"] = len(workers)
        summary["peak_pool"] = max((n for _, n in pool), default=0)
    summary["output_rows"] = _merge(output_path)
    summary["seconds"] = time.time() - t0
    summary["tokens_per_s"] = summary["completion_tokens"] / max(summary["seconds"], 1e-9)
    log.info("batch done: %(rows)d rows run, %(skipped_done)d already done, %(errors)d bad, %(completion_tokens)d "
             "tokens in %(seconds).1f s (%(tokens_per_s).0f tok/s), %(compressions)d compressions, engine actors "
             "used %(workers)d (peak pool %(peak_pool)d); %(output_rows)d rows in the output", summary)
    return summary
