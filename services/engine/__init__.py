"""The pdserve inference engine: paged KV, prefix caching, continuous batching.

Entry points: `LLM` (synchronous, offline) and `AsyncEngine` (asyncio streams, for servers).
Names are imported lazily, so torch-free users (the router needs `block_hash`,
`sampling_params`, `tokenizer`) can import submodules without loading torch or the models.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from services.engine.openmp import prefer_short_spins

prefer_short_spins()  # before anything here imports torch (openmp.py says why)

_EXPORTS = {
    "LLM": "llm",
    "AsyncEngine": "async_engine",
    "EngineConfig": "config",
    "SamplingParams": "sampling_params",
    "StructuredOutputParams": "sampling_params",
    "RequestOutput": "outputs",
    "CompletionOutput": "outputs",
    "Logprob": "outputs",
    "PdserveError": "errors",
    "InvalidRequestError": "errors",
    "ConfigError": "errors",
    "ModelLoadError": "errors",
    "EngineDeadError": "errors",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from services.engine.async_engine import AsyncEngine
    from services.engine.config import EngineConfig
    from services.engine.errors import ConfigError, EngineDeadError, InvalidRequestError, ModelLoadError, PdserveError
    from services.engine.llm import LLM
    from services.engine.outputs import CompletionOutput, Logprob, RequestOutput
    from services.engine.sampling_params import SamplingParams, StructuredOutputParams


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'services.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"services.engine.{module}"), name)
