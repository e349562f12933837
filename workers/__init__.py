"""The GPU worker and the engine it runs: scheduler, block manager, model runner, models, sampler.

The names below load on first use (PEP 562), so importing one light module of the package (its sampling
parameters, say) does not import the engine, the models and torch with it."""

from importlib import import_module

_EXPORTS = {"EngineConfig": "zipserve.workers.config", "LLMEngine": "zipserve.workers.engine",
            "LLM": "zipserve.workers.llm", "RequestOutput": "zipserve.workers.outputs",
            "SamplingParams": "zipserve.workers.sampling_params"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'zipserve.workers' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value
