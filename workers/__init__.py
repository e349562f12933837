"""The GPU worker and the engine it runs: scheduler, block manager, model runner, models, sampler."""

from workers.config import EngineConfig
from workers.engine import LLMEngine
from workers.llm import LLM
from workers.outputs import RequestOutput
from workers.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "RequestOutput", "SamplingParams"]
