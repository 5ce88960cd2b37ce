"""Assembling blocks that arrive layer by layer.

A prefill worker streaming layer-wise ships each block as pieces, each a range of its layers,
in any order and interleaved with other blocks' pieces. The receiver admits a block into its
cache only once every layer is present, exactly once; what is still incomplete when the peer
says it is done is an error, and the request recomputes what it lacks.

    block 4:  [ layers 0-0 ][ layers 1-1 ] ... [ layers L-1 ]   -> BlockData(4, ...) once all are in
    a whole block is the one-piece case: [ layers 0 .. L-1 ]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.engine.kv_transfer import BlockData
from services.kv.wire import KVWireError, LayerPiece


@dataclass
class _Partial:
    block_hash: int | None
    num_tokens: int
    tensor: torch.Tensor  # [layers, 2, num_tokens, heads, dim], filled as pieces arrive
    scales: torch.Tensor | None
    present: list[bool] = field(default_factory=list)  # per layer


class BlockAssembler:
    """Pieces in, whole blocks out. `num_layers`: the receiver's (wire.decode_piece already
    checked each piece's range, dtype and shape against it)."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self._partial: dict[int, _Partial] = {}
        self._done: set[int] = set()

    def add(self, piece: LayerPiece) -> BlockData | None:
        """The whole block once `piece` completes it, else None. Raises KVWireError for a piece
        of a block already complete, a layer received twice, or a piece that disagrees with the
        block's other pieces (token count, hash, fp8-ness)."""
        i, layers = piece.block_index, self.num_layers
        if i in self._done:
            raise KVWireError(f"block {i}: layers [{piece.layer_start}, {piece.layer_end}) after the block was complete")
        if piece.layer_start == 0 and piece.layer_end == layers and i not in self._partial:
            self._done.add(i)
            return BlockData(i, piece.block_hash, piece.tensor, piece.scales)
        part = self._partial.get(i)
        if part is None:
            t = piece.tensor
            scales = None if piece.scales is None else torch.empty(layers, 2, dtype=torch.float32)
            part = _Partial(piece.block_hash, t.shape[2], t.new_empty((layers, *t.shape[1:])), scales, [False] * layers)
            self._partial[i] = part
        if (piece.tensor.shape[2], piece.block_hash, piece.scales is None) != (
                part.num_tokens, part.block_hash, part.scales is None):
            raise KVWireError(f"block {i}: a piece disagrees with the block's other pieces "
                              "(token count, hash or scales)")
        span = range(piece.layer_start, piece.layer_end)
        if any(part.present[layer] for layer in span):
            raise KVWireError(f"block {i}: layers [{piece.layer_start}, {piece.layer_end}) received twice")
        part.tensor[piece.layer_start : piece.layer_end] = piece.tensor
        if part.scales is not None:
            part.scales[piece.layer_start : piece.layer_end] = piece.scales
        for layer in span:
            part.present[layer] = True
        if not all(part.present):
            return None
        del self._partial[i]
        self._done.add(i)
        return BlockData(i, part.block_hash, part.tensor, part.scales)

    def check_complete(self) -> None:
        """Raise KVWireError if any block still lacks layers (the peer said it is done)."""
        if self._partial:
            i, part = min(self._partial.items())
            missing = [layer for layer, present in enumerate(part.present) if not present]
            raise KVWireError(f"{len(self._partial)} block(s) incomplete: block {i} lacks layers {missing}")
