"""The pdserve inference engine: paged KV, prefix caching, continuous batching.

Entry points: `LLM` (synchronous, offline) and `AsyncEngine` (asyncio streams, for servers).
"""

from services.engine.async_engine import AsyncEngine
from services.engine.config import EngineConfig
from services.engine.errors import ConfigError, EngineDeadError, InvalidRequestError, ModelLoadError, PdserveError
from services.engine.llm import LLM
from services.engine.outputs import CompletionOutput, Logprob, RequestOutput
from services.engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "AsyncEngine",
    "EngineConfig",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "PdserveError",
    "InvalidRequestError",
    "ConfigError",
    "ModelLoadError",
    "EngineDeadError",
]
