"""The model runner: the only place that builds tensors and touches the device.

It owns the model, the paged KV cache and the sampler. Each step it takes the scheduler's
`StepPlan`, lays the step's tokens out flat (decodes first, then prefill chunks), runs the
forward, computes logits only for the rows that sample, and returns the sampled tokens.
Decode-only steps on a GPU replay a captured CUDA graph (cuda_graphs.py). It never reaches
back into scheduler state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from services.engine.attention import AttentionBackend, AttentionContext, AttentionMetadata
from services.engine.config import EngineLayout
from services.engine.cuda_graphs import DecodeGraphs, decode_splits
from services.engine.models.config import ModelConfig
from services.engine.outputs import SampledToken
from services.engine.sampler import Sampler
from services.engine.scheduler import ScheduledSeq, StepPlan


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampled]: rows of the final hidden states to sample from
    sampled_seqs: list[ScheduledSeq]  # in logits row order


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        model_config: ModelConfig,
        layout: EngineLayout,
        backend: AttentionBackend,
        sampler: Sampler,
        cuda_graph_max_batch: int = 0,  # 0: no CUDA graphs
    ) -> None:
        self.model = model
        self.layout = layout
        self.backend = backend
        self.sampler = sampler
        self.device = layout.device
        self.block_size = layout.block_size
        self.num_kv_heads = model_config.num_kv_heads
        # One tensor for the whole pool: (layers, K/V, blocks, block_size, kv_heads, head_dim).
        self.kv_cache = torch.zeros(
            model_config.num_layers,
            2,
            layout.num_kv_blocks,
            layout.block_size,
            model_config.num_kv_heads,
            model_config.head_dim,
            dtype=layout.dtype,
            device=self.device,
        )
        self.kv_caches = [(layer[0], layer[1]) for layer in self.kv_cache]
        self.graphs: DecodeGraphs | None = None
        if cuda_graph_max_batch and self.device.type == "cuda":
            max_blocks = -(-layout.max_model_len // layout.block_size)
            self.graphs = DecodeGraphs(model, backend, self.kv_caches, cuda_graph_max_batch, max_blocks,
                                       self.num_kv_heads, self.device)
            self.graphs.capture()

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> dict[int, list[SampledToken]]:
        """Run one step; returns seq_id -> sampled token(s) for the sequences that sample."""
        if plan.block_copies:
            self._copy_blocks(plan.block_copies)
        inputs = self._prepare(plan)
        meta = inputs.meta
        if self.graphs is not None and meta.num_prefills == 0 and self.graphs.fits(meta.num_decode_tokens):
            # One token per row, so token index = row; rows that do not sample are dropped.
            logits = self.graphs.run(inputs.input_ids, inputs.positions, meta.slot_mapping,
                                     meta.decode_block_tables, meta.decode_seq_lens)[inputs.logits_indices]
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, AttentionContext(self.backend, self.kv_caches, meta))
            logits = self.model.compute_logits(hidden[inputs.logits_indices])
        if not inputs.sampled_seqs:
            return {}
        groups = self.sampler(logits, [s.sample for s in inputs.sampled_seqs])
        return {s.seq_id: group for s, group in zip(inputs.sampled_seqs, groups, strict=True)}

    def read_block(self, block_id: int, num_tokens: int) -> torch.Tensor:
        """A copy of one block's first `num_tokens` slots, on the host: [layers, 2, num_tokens, kv_heads, dim]."""
        return self.kv_cache[:, :, block_id, :num_tokens].to("cpu", copy=True)

    def write_block(self, block_id: int, data: torch.Tensor) -> None:
        """Fill one block's first data.shape[2] slots (a received block) from host memory."""
        self.kv_cache[:, :, block_id, : data.shape[2]] = data.to(self.device, self.kv_cache.dtype)

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def _prepare(self, plan: StepPlan) -> StepInputs:
        bs = self.block_size
        decodes = [s for s in plan.seqs if len(s.token_ids) == 1]
        prefills = [s for s in plan.seqs if len(s.token_ids) > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        sampled: list[ScheduledSeq] = []
        for s in decodes + prefills:
            table = s.block_table
            span = range(s.start_pos, s.start_pos + len(s.token_ids))
            input_ids.extend(s.token_ids)
            positions.extend(span)
            slots.extend(table[p // bs] * bs + p % bs for p in span)
            if s.sample is not None:
                logits_indices.append(len(input_ids) - 1)
                sampled.append(s)
        query_start = [0]
        for s in prefills:
            query_start.append(query_start[-1] + len(s.token_ids))
        decode_lens = [s.start_pos + 1 for s in decodes]
        prefill_lens = [s.start_pos + len(s.token_ids) for s in prefills]

        # One host-to-device copy for all the step's integers, then views.
        t, nd, npf = len(input_ids), len(decodes), len(prefills)
        ints = torch.tensor(input_ids + positions + slots + logits_indices, dtype=torch.long)
        small = torch.tensor(decode_lens + query_start + prefill_lens, dtype=torch.int32)
        ints, small = ints.to(self.device, non_blocking=True), small.to(self.device, non_blocking=True)
        meta = AttentionMetadata(
            slot_mapping=ints[2 * t : 3 * t],
            num_decode_tokens=nd,
            decode_block_tables=self._block_tables(decodes),
            decode_seq_lens=small[:nd],
            prefill_block_tables=self._block_tables(prefills),
            prefill_query_start_loc=small[nd : nd + npf + 1],
            prefill_seq_lens=small[nd + npf + 1 :],
            prefill_max_query_len=max((len(s.token_ids) for s in prefills), default=0),
            decode_num_splits=decode_splits(nd, self.num_kv_heads, self.device),
        )
        return StepInputs(
            input_ids=ints[:t],
            positions=ints[t : 2 * t],
            meta=meta,
            logits_indices=ints[3 * t :],
            sampled_seqs=sampled,
        )

    def _block_tables(self, seqs: list[ScheduledSeq]) -> torch.Tensor:
        width = max((len(s.block_table) for s in seqs), default=0)
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return torch.tensor(rows, dtype=torch.int32).reshape(len(seqs), width).to(self.device, non_blocking=True)
