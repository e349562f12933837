"""Engine configuration: typed objects validated once, at construction; unknown keys are refused.

An option the engine does not know must fail the start, naming it, instead of running without it
(a renamed or misspelled flag would otherwise switch a feature off unnoticed).
"""

from __future__ import annotations

import os
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator

from zipserve.workers.config_model import ConfigModel

DType = Literal["float32", "float16", "bfloat16"]
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RecallConfig(ConfigModel):
    """Recall of evicted entries (workers/host_store.py): what a compression evicts is kept in pinned host
    memory, per layer and KV head, in pages with the min and max of their keys on the GPU; at each
    compression the `pages` stored pages of each (layer, head) whose bound on q.k over the query window is
    highest compete with the resident entries again. The GPU footprint stays budget + 1 pages."""

    key_kind: ClassVar[str] = "recall option"

    pages: int = Field(1, ge=1)  # closed pages each (layer, KV head) brings back per compression
    host_pages: int | None = Field(None, ge=0)  # closed pages kept per request and (layer, head); None: no cap
    host_gib: float = Field(4.0, gt=0)  # the pinned host pool, all requests together


class CompressionConfig(ConfigModel):
    """Scoring knobs of Compressed PagedAttention. Defaults: the paper's math configuration, less redundancy
    and pooling (both cost fidelity on the real model), plus three quarters of each request's budget kept
    for its most recent entries (lower KL at small budgets than none or half; README, quality study).
    Keeping the prompt (prompt_fraction) helps lookups but at small budgets leaves no entry to the scores,
    so it is off. The paper's full set is `use_redundancy=True, use_pooling=True, recent_fraction=0`."""

    key_kind: ClassVar[str] = "compression option"

    query_window: int = Field(16, ge=1)  # post-RoPE queries of the last Q cache entries score the cache
    use_global_score: bool = True
    score_decay: float = Field(0.8, ge=0, le=1)  # G = max(A, decay * G_prev), once per compression
    use_redundancy: bool = False  # the paper's set: True
    lightning_redundancy: bool = True  # pairs within one page only (else all pairs)
    redundancy_threshold: float = Field(0.5, ge=-1, le=1)
    redundancy_temperature: float = Field(0.4, gt=0)
    redundancy_lambda: float = Field(0.2, ge=0, le=1)  # S = lam * importance - (1 - lam) * redundancy
    use_pooling: bool = False  # the paper's set: True
    pooling_width: int = Field(5, ge=1)  # odd: a window centred on each entry
    continuous_pooling: bool = False  # pool at every compression, not only the first
    num_sink_tokens: int = Field(0, ge=0)  # always keep the first n cache entries (e.g. the prompt)
    prompt_fraction: float = Field(0.0, ge=0, le=1)  # ... or the request's prompt, up to this fraction of its budget
    recent_window: int = Field(0, ge=0)  # always keep the last n cache entries (H2O's; >= query_window to matter)
    recent_fraction: float = Field(0.75, ge=0, le=1)  # ... or the last fraction of the budget (1 = a sliding window)
    layer_group: int = Field(8, ge=1)  # layers scored at once (bounds the scratch memory)
    recall: RecallConfig | None = None  # None: evicted entries are gone for good (the paper's policy)

    @field_validator("pooling_width")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"pooling_width must be a positive odd integer, got {v}")
        return v

    def protected(self) -> int:
        """Entries kept whatever their score: the sinks and the recent tail (at least the query window)."""
        return self.num_sink_tokens + max(self.query_window, self.recent_window)

    def sink_entries(self, keep: int, prompt_tokens: int) -> int:
        """The leading entries always kept by a compression that keeps `keep` entries of a request with a
        prompt of `prompt_tokens`: `num_sink_tokens`, or the prompt up to `prompt_fraction` of `keep` if more,
        leaving room for the query window. Compaction keeps order, so the first entries stay the prompt's."""
        prompt = min(prompt_tokens, int(self.prompt_fraction * keep), max(0, keep - self.query_window))
        return max(self.num_sink_tokens, prompt)

    def recent_entries(self, keep: int, sinks: int) -> int:
        """The recent tail always kept by a compression that keeps `keep` entries: `recent_window`, or
        `recent_fraction` of `keep` if more, leaving room for `sinks` (the query window is added by the
        scorer, which knows it)."""
        return max(0, min(keep - sinks, max(self.recent_window, int(self.recent_fraction * keep))))

    def for_compression(self, keep: int, prompt_tokens: int) -> "CompressionConfig":
        """These knobs with the fractions resolved to counts for one compression (the scorers read the sinks
        and the tail as `num_sink_tokens` and `recent_window`). Not revalidated: the counts fit `keep`."""
        if not (self.recent_fraction or self.prompt_fraction):
            return self
        sinks = self.sink_entries(keep, prompt_tokens)
        return self.model_copy(update={"num_sink_tokens": sinks, "recent_window": self.recent_entries(keep, sinks)})

    def check_budget(self, block_size: int, budget_blocks: int | None) -> None:
        """Raise unless the protected entries fit the engine's budget of `budget_blocks` pages per request
        (None: full KV, nothing to check). A request whose own budget is smaller keeps the latest ones."""
        if budget_blocks is None:
            return
        if self.query_window > block_size:
            raise ValueError(f"query_window ({self.query_window}) must be <= block_size ({block_size})")
        if self.protected() > budget_blocks * block_size:
            raise ValueError(f"num_sink_tokens ({self.num_sink_tokens}) + max(query_window, recent_window) "
                             f"({max(self.query_window, self.recent_window)}) must be <= the budget "
                             f"({budget_blocks} pages x {block_size} = {budget_blocks * block_size} entries)")


class EngineConfig(ConfigModel):
    key_kind: ClassVar[str] = "engine config key"

    model: str  # a model folder (with its config.json)
    block_size: int = Field(256, ge=1)
    num_blocks: int | None = Field(None, ge=1)  # pages in the pool; None = size from kv_cache_memory_gb / GPU memory
    kv_cache_memory_gb: float | None = Field(None, gt=0)  # alternative to num_blocks
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)  # on CUDA when neither of the two above is set
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(8192, ge=1)  # tokens per step (decode tokens + prefill chunks)
    max_model_len: int | None = Field(None, ge=1)  # None = the model's max_position_embeddings
    enable_prefix_cache: bool = True
    backend: Literal["torch", "triton"] | None = None  # None = triton on CUDA, torch otherwise
    device: str | None = None  # None = cuda if available else cpu
    dtype: DType | None = None  # None = bfloat16 on cuda, float32 on cpu
    budget_blocks: int | None = Field(None, ge=1)  # None = full KV; else pages of history kept per request (+1 working)
    # Compressed: requests that find no reservation run on pages reserved requests are owed but have not
    # taken yet, and are preempted (recomputed) when those are wanted; False: only on pages nobody reserved.
    borrow_reserved_pages: bool = True
    # Full KV: a request is admitted only if the free pages left after it still cover this many steps of the
    # running full-KV requests' growth (at most 5% of the pool), so that admitting it does not preempt
    # (recompute) one of them a few steps later. 0: admit on what the request alone needs.
    admission_headroom_steps: int = Field(128, ge=0)
    compression: CompressionConfig = CompressionConfig()  # a CompressionConfig or a mapping of its options
    seed: int = 0
    tokenizer: str | None = None  # None = the model folder
    load_format: Literal["safetensors", "dummy"] = "safetensors"  # dummy: random weights made on the device
    fused_elementwise: bool = True  # triton: fused RMSNorm / q-k-norm+RoPE / SwiGLU kernels (False: torch ops)
    enforce_eager: bool = False  # True: no CUDA graphs for decode
    cuda_graph_max_batch: int = Field(256, ge=0)  # decode batches up to this size replay captured graphs
    tensor_parallel_size: int = Field(1, ge=1)  # GPUs (processes) one engine spans: workers/tensor_parallel.py
    # Overlap a step's host work (scheduling, input building, detokenizing, stop checks) with the previous
    # step's GPU work: sampled tokens stay on the device and feed the next step (workers/engine.py).
    async_scheduling: bool = True

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        return cls(model=model, **kwargs)

    @classmethod
    def from_yaml(cls, path: str, model: str | None = None, **overrides) -> "EngineConfig":
        """Engine config from a YAML preset (configs/engine/*.yaml); `model` and overrides win."""
        import yaml

        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: an engine config must be a mapping of options")
        data.update(overrides)
        model = model or data.pop("model", None)
        data.pop("model", None)
        if model is None:
            raise ValueError(f"{path}: no model given (set `model:` or pass one)")
        return cls.from_kwargs(model, **data)

    @field_validator("model", mode="before")
    @classmethod
    def _model_folder(cls, v):
        """A missing folder is FileNotFoundError, not a validation error: the config is fine, the disk is not."""
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        if not isinstance(v, str) or not os.path.isdir(v):
            raise FileNotFoundError(f"model folder not found: {v!r}")
        if not os.path.isfile(os.path.join(v, "config.json")):
            raise FileNotFoundError(f"no config.json in model folder {v!r}")
        return v

    @field_validator("compression", mode="before")
    @classmethod
    def _default_compression(cls, v):
        return CompressionConfig() if v is None else v

    @field_validator("device")
    @classmethod
    def _torch_device(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                torch.device(v)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"bad device {v!r}: {e}") from None
        return v

    @model_validator(mode="after")
    def _fits_device_and_budget(self) -> "EngineConfig":
        if (self.resolved_backend == "triton" and self.torch_device.type != "cuda"
                and os.environ.get("TRITON_INTERPRET") != "1"):
            raise ValueError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 to run the kernels "
                             "slowly on the CPU, as the tests do); use backend='torch' on the CPU")
        self.compression.check_budget(self.block_size, self.budget_blocks)
        return self

    @property
    def resolved_backend(self) -> str:
        if self.backend is not None:
            return self.backend
        return "triton" if self.torch_device.type == "cuda" else "torch"

    @property
    def torch_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return _DTYPES[self.dtype]
        return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32

    def to_dict(self) -> dict:
        return self.model_dump()
