"""What rank 0 sends the other ranks: a fixed-size header down each follower's pipe, then the
step's integers as one broadcast tensor.

    header  <10q: op, then up to 9 int fields (the sizes the receiver needs to split the payload)
    STEP    payload = input_ids | positions | slots | logits rows | prompt rows |
                      decode tables | decode lens | prefill tables | query starts | prefill lens
    COPY    payload = sources | destinations              (copy-on-write block copies)
    READ    block id, tokens: every rank's shard of one block, all-gathered (KV export)
    WRITE   block id, tokens: one whole block broadcast, each rank keeps its heads (KV import)

The pipe doubles as the followers' lifeline: at its end of stream rank 0 is gone and they exit.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

from services.engine.attention import AttentionMetadata
from services.engine.cuda_graphs import decode_splits

HEADER = struct.Struct("<10q")
STEP, COPY, READ, WRITE = 1, 2, 3, 4


@dataclass
class StepTensors:
    """A step as the non-zero ranks run it: the forward's inputs and the rows to score."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor
    prompt_rows: torch.Tensor  # rows scored for prompt logprobs (empty: none)


def pack_step(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
              logits_indices: torch.Tensor, prompt_rows: list[int]) -> tuple[list[int], torch.Tensor]:
    """(header fields, payload) of a step, its payload on the step's device."""
    device = input_ids.device
    parts = [input_ids, positions, meta.slot_mapping, logits_indices,
             torch.as_tensor(prompt_rows, dtype=torch.int64, device=device),
             meta.decode_block_tables.flatten(), meta.decode_seq_lens, meta.prefill_block_tables.flatten(),
             meta.prefill_query_start_loc, meta.prefill_seq_lens]
    payload = torch.cat([p.to(torch.int64) for p in parts])
    cols = meta.decode_block_tables.shape[1] if meta.num_decode_tokens else meta.prefill_block_tables.shape[1]
    fields = [input_ids.shape[0], meta.num_decode_tokens, logits_indices.shape[0], len(prompt_rows),
              meta.num_prefills, cols, meta.prefill_max_query_len, payload.shape[0]]
    return fields, payload


def unpack_step(fields: tuple[int, ...], payload: torch.Tensor, num_kv_heads: int) -> StepTensors:
    """The inverse of `pack_step`; `num_kv_heads`: this rank's (for the decode split)."""
    tokens, nd, nl, npr, npf, cols, max_query = fields[:7]
    sizes = [tokens, tokens, tokens, nl, npr, nd * cols, nd, npf * cols, npf + 1, npf]
    (ids, pos, slots, logits, prompt, dtab, dlens, ptab, qstart, plens) = payload.split(sizes)
    i32 = torch.int32
    meta = AttentionMetadata(
        slot_mapping=slots,
        num_decode_tokens=nd,
        decode_block_tables=dtab.view(nd, cols).to(i32),
        decode_seq_lens=dlens.to(i32),
        prefill_block_tables=ptab.view(npf, cols).to(i32),
        prefill_query_start_loc=qstart.to(i32),
        prefill_seq_lens=plens.to(i32),
        prefill_max_query_len=max_query,
        decode_split=decode_splits(nd, num_kv_heads, payload.device),
    )
    return StepTensors(ids, pos, meta, logits, prompt)
