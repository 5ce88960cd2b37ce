"""The same-GPU KV transport's protocol, run on the CPU: real prefill and decode servicers over
gRPC on loopback in one process, with the decode side "mapping" the prefill engine's own pool
tensor where the GPU path maps it through a CUDA IPC handle (that part runs in tests/test_gpu.py
on the device). Checked: the tokens, that the stream carries references and no bytes, and that
every block the stream named is released on both sides, whether the request finishes, is
cancelled, or the decode worker never says."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from types import SimpleNamespace

import grpc
import pytest
import torch

from pdserve.v1 import kv_pb2, worker_pb2, worker_pb2_grpc
from services.decode.server import DecodeServicer
from services.engine.async_engine import AsyncEngine
from services.kv import cuda_ipc
from services.kv.cuda_ipc import CudaIpcKVTransport
from services.prefill import server as prefill_server
from services.prefill.server import PrefillServicer
from services.rpc.convert import params_to_proto
from services.rpc.worker import identity_of
from tests.conftest import assert_all_free, make_llm
from tests.test_kv_transfer import GREEDY

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = list(range(1000, 1150))  # 150 tokens: 9 full blocks and a partial one


@pytest.fixture(scope="module")
def prefill_llm():
    return make_llm("tiny-llama", max_num_batched_tokens=32)  # several chunks: blocks stream out


@pytest.fixture(scope="module")
def decode_llm():
    return make_llm("tiny-llama")


@pytest.fixture(scope="module")
def expected(decode_llm):
    tokens = decode_llm.generate(PROMPT, GREEDY)[0].outputs[0].token_ids
    decode_llm.engine.block_manager.reset_prefix_cache()
    return tokens


@pytest.fixture(autouse=True)
def cold_caches(prefill_llm, decode_llm):
    """Each test ships the whole prompt: neither side starts with its blocks cached."""
    for llm in (prefill_llm, decode_llm):
        llm.engine.block_manager.reset_prefix_cache()


@pytest.fixture
def cpu_pool_exported(monkeypatch):
    """The prefill worker offers its (CPU) pool as the GPU path offers a CUDA one."""
    def export(pool):
        return kv_pb2.KVPool(device_uuid="cpu-in-process", dtype=str(pool.dtype).removeprefix("torch."),
                             shape=list(pool.shape), stride=list(pool.stride()),
                             storage_bytes=pool.numel() * pool.element_size(), pool_id=secrets.randbits(64))

    monkeypatch.setattr(cuda_ipc, "export_pool", export)


@contextlib.asynccontextmanager
async def workers(prefill_llm, decode_llm, opener):
    """A prefill and a decode servicer on loopback: their stubs, engines and servicers."""
    prefill_engine, decode_engine = AsyncEngine(core=prefill_llm.engine), AsyncEngine(core=decode_llm.engine)
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    core = decode_llm.engine
    cfg = core.model_config
    transport = CudaIpcKVTransport(
        {"p": f"127.0.0.1:{port}"}, "d", identity_of(decode_engine),
        (cfg.num_layers, 2, core.layout.block_size, cfg.num_kv_heads, cfg.head_dim), core.layout.kv_dtype,
        device=torch.device("cpu"), open=opener,
    )
    prefill_servicer = PrefillServicer(prefill_engine, "p")
    worker_pb2_grpc.add_PrefillWorkerServicer_to_server(prefill_servicer, server)
    worker_pb2_grpc.add_DecodeWorkerServicer_to_server(DecodeServicer(decode_engine, "d", transport), server)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield SimpleNamespace(decode=worker_pb2_grpc.DecodeWorkerStub(channel),
                              prefill=worker_pb2_grpc.PrefillWorkerStub(channel), prefill_engine=prefill_engine,
                              decode_engine=decode_engine, prefill_servicer=prefill_servicer)
    finally:
        await channel.close()
        await transport.close()
        await server.stop(0)
        prefill_engine.shutdown()
        decode_engine.shutdown()


def decode_request(prompt=PROMPT, request_id="r1") -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(request_id=request_id, prompt_token_ids=prompt,
                                    sampling=params_to_proto(GREEDY), prefill_instance="p")


async def generate(stub, request) -> tuple[list[int], object]:
    tokens, last = [], None
    async for response in stub.Generate(request):
        for c in response.outputs:
            tokens += c.token_ids
        last = response
    return tokens, last


async def until(condition, timeout=10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def blocks_of(response: worker_pb2.PrefillResponse) -> list[kv_pb2.KVBlock]:
    """The blocks a Prefill stream message carries: one, a step's batch, or none (the result)."""
    if response.HasField("blocks"):
        return list(response.blocks.blocks)
    return [response.block] if response.HasField("block") else []


def own_pool(prefill_llm):
    return lambda msg: prefill_llm.engine.runner.kv_cache


def test_blocks_travel_by_reference_and_every_slot_is_released(cpu_pool_exported, prefill_llm, decode_llm,
                                                                 expected):
    async def scenario():
        async with workers(prefill_llm, decode_llm, own_pool(prefill_llm)) as w:
            tokens, last = await generate(w.decode, decode_request())
            await until(lambda: w.prefill_engine.core.num_held_requests == 0)
            return tokens, last.disaggregation

    tokens, record = asyncio.run(scenario())
    assert tokens == expected
    assert record.kv_transport == "cuda_ipc" and record.remote_prefill
    assert record.kv_blocks_shipped == 10 and record.decode_computed_prompt_tokens == 0
    cfg = decode_llm.engine.model_config
    assert record.kv_bytes_shipped == cfg.num_layers * 2 * 150 * cfg.num_kv_heads * cfg.head_dim * 4
    assert_all_free(prefill_llm)
    assert_all_free(decode_llm)


def test_a_pool_decode_cannot_map_falls_back_to_bytes(cpu_pool_exported, prefill_llm, decode_llm, expected):
    async def scenario():
        async with workers(prefill_llm, decode_llm, lambda msg: None) as w:
            tokens, last = await generate(w.decode, decode_request(request_id="r2"))
            assert w.prefill_engine.core.num_held_requests == 0  # nothing was shipped by reference
            return tokens, last.disaggregation

    tokens, record = asyncio.run(scenario())
    assert tokens == expected and record.kv_transport == "grpc" and record.kv_blocks_shipped == 10
    assert_all_free(prefill_llm)
    assert_all_free(decode_llm)


def test_a_cancelled_request_releases_the_slots_on_both_sides(cpu_pool_exported, prefill_llm, decode_llm):
    async def scenario():
        async with workers(prefill_llm, decode_llm, own_pool(prefill_llm)) as w:
            for delay in (0.0, 0.05, 0.2):  # before, during and after the transfer
                call = w.decode.Generate(decode_request(request_id=f"c{delay}"))
                await asyncio.sleep(delay)
                call.cancel()
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                    async for _ in call:
                        pass
            await until(lambda: w.prefill_engine.core.num_held_requests == 0 and not w.prefill_engine.core.requests
                        and not w.decode_engine.core.requests)

    asyncio.run(scenario())
    assert_all_free(prefill_llm)
    assert_all_free(decode_llm)


def test_a_peer_restarted_at_the_same_address_is_mapped_again(cpu_pool_exported, prefill_llm, decode_llm,
                                                              expected):
    """A request naming a pool the peer no longer has is refused (it recomputes locally) and
    the next one handshakes and maps the new pool: references never point into a dead pool."""
    async def scenario():
        async with workers(prefill_llm, decode_llm, own_pool(prefill_llm)) as w:
            first, _ = await generate(w.decode, decode_request(request_id="a"))
            w.prefill_servicer._kv_pool.pool_id ^= 1  # as if the peer restarted behind the same address
            w.prefill_engine.core.block_manager.reset_prefix_cache()
            w.decode_engine.core.block_manager.reset_prefix_cache()
            stale, stale_last = await generate(w.decode, decode_request(request_id="b"))
            w.decode_engine.core.block_manager.reset_prefix_cache()
            again, again_last = await generate(w.decode, decode_request(request_id="c"))
            await until(lambda: w.prefill_engine.core.num_held_requests == 0)
            return first, (stale, stale_last.disaggregation), (again, again_last.disaggregation)

    first, (stale, stale_record), (again, again_record) = asyncio.run(scenario())
    assert first == stale == again == expected
    assert stale_record.kv_blocks_shipped == 0 and stale_record.decode_computed_prompt_tokens == 150
    assert again_record.kv_transport == "cuda_ipc" and again_record.decode_computed_prompt_tokens == 0
    assert_all_free(prefill_llm)
    assert_all_free(decode_llm)


def test_slots_nobody_releases_are_freed_after_the_hold_timeout(cpu_pool_exported, prefill_llm, decode_llm,
                                                                 monkeypatch):
    monkeypatch.setattr(prefill_server, "KV_HOLD_TIMEOUT_S", 0.3)

    async def scenario():
        async with workers(prefill_llm, decode_llm, own_pool(prefill_llm)) as w:
            pool_id = (await w.prefill.Handshake(worker_pb2.HandshakeRequest(want_kv_pool=True))).kv_pool.pool_id
            request = worker_pb2.PrefillRequest(request_id="orphan", prompt_token_ids=PROMPT, kv_pool_id=pool_id,
                                                sampling=params_to_proto(GREEDY), kv_by_reference=True)
            refs = [b async for r in w.prefill.Prefill(request) for b in blocks_of(r)]
            assert refs and all(b.HasField("pool_block") and not b.data for b in refs)
            # The engine knows a request by the caller's certificate name and its id ("-": plaintext).
            assert w.prefill_engine.core.is_held("-/orphan")
            await until(lambda: not w.prefill_engine.core.is_held("-/orphan"))

    asyncio.run(scenario())
    assert_all_free(prefill_llm)


def test_references_are_refused_without_a_gpu_pool_or_a_request_id(prefill_llm, decode_llm):
    async def scenario():
        async with workers(prefill_llm, decode_llm, own_pool(prefill_llm)) as w:
            codes = []
            for request_id in ("x", ""):
                request = worker_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=PROMPT,
                                                    sampling=params_to_proto(GREEDY), kv_by_reference=True)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in w.prefill.Prefill(request):
                        pass
                codes.append(e.value.code())
            response = await w.prefill.Handshake(worker_pb2.HandshakeRequest(want_kv_pool=True))
            return codes, response

    codes, response = asyncio.run(scenario())
    # This CPU worker exports no pool (the real export_pool), so it offers none and ships none.
    assert codes == [grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT]
    assert not response.HasField("kv_pool")
    assert_all_free(prefill_llm)


@pytest.mark.parametrize("batch_bytes, most", [(4 << 20, 2), (1, 1)])
def test_a_steps_blocks_share_a_message_up_to_the_byte_cap(prefill_llm, decode_llm, monkeypatch, batch_bytes, most):
    """Bytes over gRPC: the blocks of one step (two 16-token blocks per 32-token chunk here) go in
    one message, unless the cap splits them; every block arrives once, in order."""
    monkeypatch.setattr(prefill_server, "BATCH_BYTES", batch_bytes)

    async def scenario():
        async with workers(prefill_llm, decode_llm, own_pool(prefill_llm)) as w:
            request = worker_pb2.PrefillRequest(request_id="b", prompt_token_ids=PROMPT,
                                                sampling=params_to_proto(GREEDY))
            return [blocks_of(r) async for r in w.prefill.Prefill(request)]

    messages = [m for m in asyncio.run(scenario()) if m]
    assert [b.block_index for m in messages for b in m] == list(range(10))
    assert max(len(m) for m in messages) == most
    assert_all_free(prefill_llm)
