"""`--speculative-config`: vLLM's JSON form, validated once.

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    {"method": "self_spec", "num_speculative_tokens": 3, "num_layers": 8}
    {"method": "draft_model", "num_speculative_tokens": 3, "model": "/path/or/file.gguf"}

A draft model may also be random weights of a preset (`"load_format": "dummy", "preset":
"tiny-llama", "dummy_seed": 1`), for tests and benchmarks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields

from services.engine.errors import ConfigError

METHODS = ("ngram", "self_spec", "draft_model")
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2  # ngram: the shortest suffix matched
    prompt_lookup_max: int = 5  # ngram: the longest (tried first)
    num_layers: int | None = None  # self_spec: the target's first layers that draft (default: a quarter)
    model: str | None = None  # draft_model: its weights (None: the default model)
    load_format: str = "auto"  # draft_model: auto | dummy
    preset: str | None = None  # draft_model: shape of dummy weights
    dummy_seed: int = 0
    # No speculation in a step while this many sequences run (vLLM's knob): at larger batches
    # the verifying step's k+1 rows per sequence cost more than the steps they save.
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ConfigError(f"num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}]")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ConfigError("need 1 <= prompt_lookup_min <= prompt_lookup_max")
        if self.num_layers is not None and self.num_layers < 1:
            raise ConfigError("num_layers must be >= 1")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ConfigError("disable_by_batch_size must be >= 1")
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError(f"load_format must be auto or dummy, got {self.load_format!r}")

    @classmethod
    def parse(cls, value: str | Mapping | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """From the JSON text of the flag, a dict (`LLM(speculative_config={...})`), or as is."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--speculative-config is not JSON: {e}") from None
        if not isinstance(value, Mapping):
            raise ConfigError("the speculative config is a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"unknown speculative config keys: {', '.join(unknown)}")
        if "method" not in value:
            raise ConfigError("the speculative config needs a method (ngram, self_spec, draft_model)")
        return cls(**value)
