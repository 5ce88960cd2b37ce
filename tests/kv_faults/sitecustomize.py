"""Test-only KV faults, loaded through a spawned worker's PYTHONPATH (tests/test_services.py,
tests/test_gpu.py); the product carries no such switch. In that worker's environment:

PDSERVE_TEST_PERTURB_KV=1  decode adds noise to the K of every block it receives, after the
                           checksum check: output then differs iff decode really uses shipped KV.
PDSERVE_TEST_CORRUPT_KV=1  prefill flips one byte of every block it ships by bytes, after the
                           checksum: decode must detect it and recompute locally.
PDSERVE_TEST_DUPLICATE_LAYER_PIECE=1  a layer-wise prefill labels every layer-1 piece as layer 0's
                           (tests/test_kv_layerwise_services.py): decode must refuse the block.
PDSERVE_TEST_DIE_MID_LAYERWISE=1  a layer-wise prefill dies (os._exit) as it encodes the first piece
                           of block 4, after blocks 0-3 went out: decode must fall back.
PDSERVE_TEST_BAD_NIXL_METADATA=1  prefill announces garbage NIXL agent metadata at the handshake
                           (tests/test_kv_nixl.py): decode must refuse it and take bytes over gRPC.
"""

from __future__ import annotations

import dataclasses
import os

if os.environ.get("PDSERVE_TEST_PERTURB_KV") == "1":
    import torch

    from services.decode import server as _decode

    _receive = _decode.DecodeServicer._receive

    def _perturbed(self, request_id, block, record):
        # Noise (std 5), not a constant: softmax ignores a shift common to all keys. A clone,
        # since a by-reference block is a view of the peer's cache.
        tensor = block.tensor.clone()
        k = tensor[:, 0]
        noise = torch.randn(k.shape, generator=torch.Generator().manual_seed(block.block_index))
        k.add_((5 * noise).to(k.device, k.dtype))
        return _receive(self, request_id, dataclasses.replace(block, tensor=tensor), record)

    _decode.DecodeServicer._receive = _perturbed

if os.environ.get("PDSERVE_TEST_CORRUPT_KV") == "1":
    from services.kv import wire as _wire

    _encode = _wire.encode

    def _corrupted(block):
        msg = _encode(block)
        msg.data = bytes([msg.data[0] ^ 0xFF]) + msg.data[1:]
        return msg

    _wire.encode = _corrupted

if os.environ.get("PDSERVE_TEST_BAD_NIXL_METADATA") == "1":
    # The agent's module: the pool is registered there in the worker's process and in an
    # engine-core process alike (this file loads in both).
    from services.kv import nixl_agent as _nixl

    _register = _nixl.register_pool

    def _bad_metadata(agent, pool):
        registered = _register(agent, pool)
        msg = registered.announcement
        msg.agent_metadata = bytes(b ^ 0x5A for b in msg.agent_metadata[:64]) + msg.agent_metadata[64:]
        return registered

    _nixl.register_pool = _bad_metadata

if os.environ.get("PDSERVE_TEST_DUPLICATE_LAYER_PIECE") == "1":
    from services.kv import wire as _wire

    _encode_piece = _wire.encode

    def _duplicated(block):
        msg = _encode_piece(block)
        if block.layer_start == 1:
            msg.layer_start, msg.layer_end = 0, block.tensor.shape[0]
        return msg

    _wire.encode = _duplicated

if os.environ.get("PDSERVE_TEST_DIE_MID_LAYERWISE") == "1":
    from services.kv import wire as _wire

    _encode_alive = _wire.encode

    def _dying(block):
        if block.block_index >= 4:
            os._exit(1)
        return _encode_alive(block)

    _wire.encode = _dying
