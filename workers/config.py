"""Engine configuration: one typed object, validated once, unknown keys rejected.

Zipage silently dropped options it did not know (its README ran without a feature because of a
renamed flag); here every key must be a field, or `EngineConfig.from_kwargs` raises naming it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class CompressionConfig:
    """Scoring knobs of Compressed PagedAttention. Defaults: the paper's math configuration, less redundancy
    and pooling, plus three quarters of each request's budget kept for its most recent entries. Measured in
    benchmarks/quality: on the real model (SmolLM2 fidelity, 4 x 2,048 tokens) that tail cuts KL 3.2x / 6.9x
    at 12% / 25% budgets against none (half the budget: 2.9x / 5.6x); on the trained tasks (H200) 75% beats
    half at every budget (lookup at 25%: 0.96 vs 0.91 of full KV). Keeping the prompt (prompt_fraction)
    helps the lookup task but leaves no entry to the scores at small budgets, doubling SmolLM2's KL at 12%,
    so it is off. The paper's full set is `use_redundancy=True, use_pooling=True, recent_fraction=0`."""

    query_window: int = 16  # post-RoPE queries of the last Q cache entries score the cache
    use_global_score: bool = True
    score_decay: float = 0.8  # G = max(A, decay * G_prev), once per compression
    use_redundancy: bool = False  # the paper's set: True
    lightning_redundancy: bool = True  # pairs within one page only (else all pairs)
    redundancy_threshold: float = 0.5
    redundancy_temperature: float = 0.4
    redundancy_lambda: float = 0.2  # S = lam * importance - (1 - lam) * redundancy
    use_pooling: bool = False  # the paper's set: True
    pooling_width: int = 5
    continuous_pooling: bool = False  # pool at every compression, not only the first
    num_sink_tokens: int = 0  # always keep the first n cache entries (e.g. the prompt)
    prompt_fraction: float = 0.0  # ... or the request's prompt, up to this fraction of its budget, if more
    recent_window: int = 0  # always keep the last n cache entries (H2O's recent tokens; >= query_window to matter)
    recent_fraction: float = 0.75  # ... or the last fraction of the request's budget, if more (1 = a sliding window)
    layer_group: int = 8  # layers scored at once (bounds the scratch memory)

    @classmethod
    def from_value(cls, value) -> "CompressionConfig":
        if isinstance(value, cls):
            return value
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise ValueError(f"compression must be a mapping of options, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown compression option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**value)

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
        and the tail as `num_sink_tokens` and `recent_window`)."""
        if not (self.recent_fraction or self.prompt_fraction):
            return self
        sinks = self.sink_entries(keep, prompt_tokens)
        return dataclasses.replace(self, num_sink_tokens=sinks, recent_window=self.recent_entries(keep, sinks))

    def validate(self, block_size: int, budget_blocks: int | None) -> None:
        """budget_blocks: the engine's pages of history per request (None: full KV, nothing to check
        against). A request whose own budget is smaller keeps the latest protected entries."""
        _positive_int(self, "query_window")
        _positive_int(self, "layer_group")
        for name in ("num_sink_tokens", "recent_window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if budget_blocks is not None:
            if self.query_window > block_size:
                raise ValueError(f"query_window ({self.query_window}) must be <= block_size ({block_size})")
            if self.protected() > budget_blocks * block_size:
                raise ValueError(f"num_sink_tokens ({self.num_sink_tokens}) + max(query_window, recent_window) "
                                 f"({max(self.query_window, self.recent_window)}) must be <= the budget "
                                 f"({budget_blocks} pages x {block_size} = {budget_blocks * block_size} entries)")
        if not isinstance(self.pooling_width, int) or self.pooling_width < 1 or self.pooling_width % 2 == 0:
            raise ValueError(f"pooling_width must be a positive odd integer, got {self.pooling_width!r}")
        for name, lo, hi in (("score_decay", 0, 1), ("recent_fraction", 0, 1), ("prompt_fraction", 0, 1),
                             ("redundancy_threshold", -1, 1), ("redundancy_lambda", 0, 1)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {v!r}")
        if not isinstance(self.redundancy_temperature, (int, float)) or not self.redundancy_temperature > 0:
            raise ValueError(f"redundancy_temperature must be > 0, got {self.redundancy_temperature!r}")


@dataclass
class EngineConfig:
    model: str
    block_size: int = 256
    num_blocks: int | None = None  # pages in the pool; None = size from kv_cache_memory_gb / GPU memory
    kv_cache_memory_gb: float | None = None  # alternative to num_blocks
    gpu_memory_utilization: float = 0.9  # on CUDA when neither of the two above is set
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192  # tokens per step (decode tokens + prefill chunks)
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    enable_prefix_cache: bool = True
    backend: str | None = None  # "torch" | "triton"; None = triton on CUDA, torch otherwise
    device: str | None = None  # None = cuda if available else cpu
    dtype: str | None = None  # None = bfloat16 on cuda, float32 on cpu
    budget_blocks: int | None = None  # None = full KV; else pages of history kept per request (+1 working)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    seed: int = 0
    tokenizer: str | None = None  # None = the model folder
    load_format: str = "safetensors"  # or "dummy": random weights made on the device (benchmarks)
    fused_elementwise: bool = True  # triton: fused RMSNorm / q-k-norm+RoPE / SwiGLU kernels (False: torch ops)
    enforce_eager: bool = False  # True: no CUDA graphs for decode
    cuda_graph_max_batch: int = 256  # decode batches up to this size replay captured graphs
    tensor_parallel_size: int = 1  # GPUs (processes) one engine spans: workers/tensor_parallel.py
    # Overlap a step's host work (scheduling, input building, detokenizing, stop checks) with the previous
    # step's GPU work: sampled tokens stay on the device and feed the next step (workers/engine.py).
    async_scheduling: bool = True

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"unknown engine config key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
            )
        if "compression" in kwargs:
            kwargs["compression"] = CompressionConfig.from_value(kwargs["compression"])
        cfg = cls(model=model, **kwargs)
        cfg.validate()
        return cfg

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

    def validate(self) -> None:
        if not isinstance(self.model, (str, os.PathLike)) or not os.path.isdir(self.model):
            raise FileNotFoundError(f"model folder not found: {self.model!r}")
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise FileNotFoundError(f"no config.json in model folder {self.model!r}")
        _positive_int(self, "block_size")
        _positive_int(self, "max_num_seqs")
        _positive_int(self, "max_num_batched_tokens")
        _positive_int(self, "tensor_parallel_size")
        if self.num_blocks is not None:
            _positive_int(self, "num_blocks")
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None:
            _positive_int(self, "max_model_len")
        if self.load_format not in ("safetensors", "dummy"):
            raise ValueError(f"load_format must be 'safetensors' or 'dummy', got {self.load_format!r}")
        if self.backend not in (None, "torch", "triton"):
            raise ValueError(f"backend must be 'torch' or 'triton', got {self.backend!r}")
        if (self.resolved_backend == "triton" and self.torch_device.type != "cuda"
                and os.environ.get("TRITON_INTERPRET") != "1"):
            raise ValueError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 to run the kernels "
                             "slowly on the CPU, as the tests do); use backend='torch' on the CPU")
        if self.budget_blocks is not None:
            _positive_int(self, "budget_blocks")
        self.compression.validate(self.block_size, self.budget_blocks)
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"bad device {self.device!r}: {e}") from None

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
        return dataclasses.asdict(self)


def _positive_int(cfg, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
