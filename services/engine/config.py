"""Engine configuration: what the user chose, validated once, never mutated.

Values derived from it and from the model (device, dtype, number of KV blocks, max model
length, EOS ids) live in `EngineLayout`, built once at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from services.engine.errors import ConfigError
from services.engine.quant import QUANTIZATIONS
from services.engine.spec.config import SpeculativeConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# --kv-cache-dtype: auto = the model's dtype; fp8 = e4m3 with per-tensor scales (kernels/cache.py)
KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}
GiB = 1 << 30
# Tokens per step when the user names no budget. A step is the unit a cancel or a deadline waits
# for, so on the CPU (tens of ms per 100 tokens of a 0.5B model) a long prompt is chunked finely
# enough that an abort frees its blocks within about a second. On a GPU a step of 8,192 tokens
# (vLLM's and SGLang's serving default there) takes ~30 ms for a 1B model on an H100, and a
# step of prompt chunks is eager (host-bound): under a closed loop of 512-token prompts the
# engine made 43.2k tok/s at 8,192 against 30.9k at 2,048 (BENCHMARKS.md, issue #32).
STEP_TOKENS = {"cpu": 512, "cuda": 8192}
# The Python `LLM` API's (offline work, nothing to cancel): the same on a GPU, 2,048 on the CPU.
API_STEP_TOKENS = {"cpu": 2048, "cuda": 8192}

# Where `gguf_weights=auto` keeps GGUF blocks as stored. Not on the CPU: there decode with
# on-the-fly dequantization ran at 0.28x (batch 1) and 0.49x (batch 8) of the converted fp32
# path (BENCHMARKS.md, 2026-12-05), and the rule is native only at >= 0.9x. Not on
# CUDA until GPU figures exist (loadtest/bench_quant.py).
GGUF_NATIVE_DEFAULT = {"cpu": False, "cuda": False}


def default_step_tokens(device: torch.device) -> int:
    return STEP_TOKENS.get(device.type, 2048)


@dataclass(frozen=True)
class EngineConfig:
    # Model.
    model: str | None = None  # HF directory or .gguf file; None = the default model
    load_format: str = "auto"  # auto | dummy
    preset: str | None = None  # shape preset for dummy weights
    dummy_seed: int = 0
    tokenizer: str | None = None
    cache_dir: Path | None = None
    # Weights (services/engine/quant). quantization: None (as stored) | int8 | fp8, applied to
    # a dense checkpoint's Linear weights as they load. gguf_weights: native keeps a GGUF
    # model's blocks as stored, converted dequantizes them once (cached); auto: GGUF_NATIVE_DEFAULT.
    quantization: str | None = None
    gguf_weights: str = "auto"
    # Numerics and placement.
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on GPU) | float32 | bfloat16 | float16
    attention_backend: str = "auto"  # auto (triton on GPU, torch elsewhere) | torch | triton
    enforce_eager: bool = False  # no CUDA graphs (decode steps, and steps of one prompt chunk)
    # KV cache.
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | fp8 (e4m3, half of bf16's bytes)
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; default 1 GiB on CPU
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # overrides both of the above (tests, benchmarks)
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # default: the model's context length
    # Scheduling.
    max_num_batched_tokens: int | None = None  # None: API_STEP_TOKENS of the device
    max_num_seqs: int = 256
    seed: int = 0  # the RNG of unseeded requests
    # Plan step N+1 while step N runs, reading N's tokens back afterwards (engine.py).
    # None: on for CUDA, where the host would otherwise leave the GPU idle; off on the CPU.
    async_scheduling: bool | None = None
    # Speculative decoding (spec/config.py); None: off. Speculating steps are synchronous.
    speculative_config: SpeculativeConfig | None = None
    # Tensor parallelism: ranks (processes, one device each) the model's heads, MLP and
    # vocabulary are split across (services/engine/parallel/).
    tensor_parallel_size: int = 1
    # Pipeline parallelism: stages (process groups) the decoder layers are split across.
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.gguf_weights not in ("auto", "native", "converted"):
            raise ConfigError(f"gguf_weights must be auto, native or converted, got {self.gguf_weights!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be auto or fp8, got {self.kv_cache_dtype!r}")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            raise ConfigError(f"block_size must be a power of two up to 256, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError("kv_cache_memory must be positive")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("gpu_memory_utilization must be in (0, 1]")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError("num_kv_blocks must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError("max_model_len must be >= 2")
        if (self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1) or self.max_num_seqs < 1:
            raise ConfigError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size and pipeline_parallel_size must be >= 1, got "
                              f"{self.tensor_parallel_size} and {self.pipeline_parallel_size}")
        if self.tensor_parallel_size * self.pipeline_parallel_size > 1 and self.speculative_config is not None:
            raise ConfigError("speculative decoding with tensor or pipeline parallelism is not supported yet")

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda requested but no CUDA device is available")
        return device

    def resolve_step_tokens(self, device: torch.device) -> int:
        return self.max_num_batched_tokens or API_STEP_TOKENS.get(device.type, 2048)

    def resolve_gguf_native(self, device: torch.device) -> bool | None:
        """Whether a GGUF model loads natively (None: where its architecture allows)."""
        if self.gguf_weights == "auto":
            return None if GGUF_NATIVE_DEFAULT.get(device.type, False) else False
        return self.gguf_weights == "native"

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if device.type == "cpu" else torch.bfloat16
        return DTYPES[self.dtype]

    def resolve_kv_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The KV cache's dtype for a model computing in `dtype`."""
        return dtype if self.kv_cache_dtype == "auto" else KV_CACHE_DTYPES[self.kv_cache_dtype]


@dataclass(frozen=True)
class EngineLayout:
    """What start-up derived from the config and the model."""

    device: torch.device
    dtype: torch.dtype
    kv_dtype: torch.dtype  # the KV cache's: dtype, or float8_e4m3fn
    num_kv_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    model_identity: str

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size
