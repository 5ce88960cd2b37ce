"""How many KV blocks the pool gets: never "all free memory".

CPU: `kv_cache_memory` bytes (default 1 GiB). GPU: a profile run first measures the peak
memory of the largest step (max_num_batched_tokens tokens of prefill, logits for as many rows
as may sample); the pool then takes what is left of gpu_memory_utilization x total memory,
after weights, that peak, what other processes hold and a reserve for CUDA graphs.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from services.engine.attention import AttentionBackend, AttentionContext, AttentionMetadata
from services.engine.config import GiB, EngineConfig
from services.engine.models.config import ModelConfig

log = logging.getLogger("pdserve.engine")

_CUDA_GRAPH_RESERVE = GiB // 2


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """`dtype`: the cache's (an fp8 cache's blocks are half of bf16's; its scales are per layer, not per block)."""
    return cfg.kv_bytes_per_token * block_size * torch.empty((), dtype=dtype).element_size()


def num_kv_blocks(config: EngineConfig, cfg: ModelConfig, model: nn.Module, backend: AttentionBackend,
                  device: torch.device, dtype: torch.dtype, max_model_len: int, extra_per_block: int = 0) -> int:
    """How many KV blocks of cache dtype `dtype` fit the budget; `extra_per_block`: bytes another
    pool indexed by the same block ids needs for each (a speculative draft model's KV)."""
    per_block = bytes_per_block(cfg, config.block_size, dtype) + extra_per_block
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if device.type != "cuda":
        return int((config.kv_cache_memory or GiB) // per_block)
    held = torch.cuda.memory_allocated(device)  # weights, and whatever else this process keeps
    activations = _profile_peak(config, cfg, model, backend, device, dtype, max_model_len) - held
    free, total = torch.cuda.mem_get_info(device)
    others = total - free - torch.cuda.memory_reserved(device)  # other processes, CUDA context
    budget = config.gpu_memory_utilization * total - others - held - activations - _CUDA_GRAPH_RESERVE
    log.info("GPU memory: total %.1f GiB, held %.1f GiB (weights), a %d-token step %.1f GiB, other processes "
             "%.1f GiB -> KV pool %.1f GiB", total / GiB, held / GiB, config.max_num_batched_tokens,
             activations / GiB, others / GiB, max(budget, 0) / GiB)
    return int(budget // per_block)


@torch.inference_mode()
def _profile_peak(config: EngineConfig, cfg: ModelConfig, model: nn.Module, backend: AttentionBackend,
                  device: torch.device, dtype: torch.dtype, max_model_len: int) -> int:
    """Peak allocated bytes during one full-budget prefill step (its throwaway KV cache excluded)."""
    tokens = config.max_num_batched_tokens
    blocks = -(-tokens // config.block_size)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    cache = torch.zeros(cfg.num_layers, 2, blocks, config.block_size, cfg.num_kv_heads, cfg.head_dim,
                        dtype=dtype, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(tokens, device=device),
        num_decode_tokens=0,
        decode_block_tables=torch.zeros(0, 0, **i32),
        decode_seq_lens=torch.zeros(0, **i32),
        prefill_block_tables=torch.arange(blocks, **i32)[None],
        prefill_query_start_loc=torch.tensor([0, tokens], **i32),
        prefill_seq_lens=torch.tensor([tokens], **i32),
        prefill_max_query_len=tokens,
    )
    ids = torch.zeros(tokens, dtype=torch.long, device=device)
    # Within the rotary table (max_model_len rows): the GPU kernel does not bounds-check.
    positions = torch.arange(tokens, device=device) % max_model_len
    hidden = model(ids, positions, AttentionContext(backend, [(c[0], c[1]) for c in cache], meta))
    if getattr(model, "pipe", None) is None or model.pipe.first:  # a later pipeline stage has no LM head
        model.compute_logits(hidden[: min(tokens, config.max_num_seqs)])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - cache.numel() * cache.element_size()
    del cache, hidden
    torch.cuda.empty_cache()
    return peak
