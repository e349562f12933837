"""Offline batch generation over the engine: `LLM(model, **config).generate(prompts, params)`."""

from __future__ import annotations

import itertools

from tqdm.auto import tqdm

from zipserve.workers.config import EngineConfig
from zipserve.workers.tensor_parallel import make_engine
from zipserve.workers.outputs import RequestOutput
from zipserve.workers.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, *, config_file: str | None = None, **config):
        """LLM(model, **config), or LLM(config_file="configs/engine/x.yaml", **overrides)."""
        if config_file is not None:
            cfg = EngineConfig.from_yaml(config_file, model, **config)
        elif model is None:
            raise ValueError("LLM needs a model folder (or config_file=...)")
        else:
            cfg = EngineConfig.from_kwargs(model, **config)
        self.engine = make_engine(cfg)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; results in input order. Bad input raises before any work."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        added = []
        try:
            for rid, prompt, p in zip(ids, prompts, params):
                self.engine.add_request(rid, prompt, p)
                added.append(rid)
        except Exception:
            for rid in added:  # leave the engine as it was
                self.engine.abort_request(rid)
            raise
        position = {rid: i for i, rid in enumerate(ids)}
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(prompts), desc="generate", unit="req", disable=not use_tqdm)
        scored: dict[str, list] = {}  # prompt logprobs, which come with a request's first output
        try:
            while len(results) < len(ids):
                for out in self.engine.step():
                    if out.prompt_logprobs is not None:
                        scored[out.request_id] = out.prompt_logprobs
                    if out.finished:
                        out.prompt_logprobs = scored.pop(out.request_id, None)
                        prompt = prompts[position[out.request_id]]
                        out.prompt = prompt if isinstance(prompt, str) else None
                        results[out.request_id] = out
                        bar.update(1)
        finally:
            bar.close()
            for rid in ids:
                if rid not in results:
                    self.engine.abort_request(rid)
        return [results[r] for r in ids]

    def stats(self) -> dict:
        return self.engine.stats()
