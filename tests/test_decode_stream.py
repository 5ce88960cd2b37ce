"""Batched worker -> router streams (issue #32): the router's requests to a decode worker share
one GenerateStream (router/decode_stream.py, services/decode/mux.py).

Run in one process on loopback: a real decode servicer (tiny dummy model) behind the same
server plumbing the workers use, and the router's own `stream` (routing, _attempt, the shared
stream). Checked: a step's tokens of many requests cross as one frame; 200 concurrent streams
arrive complete and in order; a client that stops reading stalls nobody else; cancel and
deadlines free every KV block. Faults (a worker killed or frozen under a shared stream) run in
tests/test_faults*.py against real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

import pytest

import grpc

from pdserve.v1 import router_pb2, worker_pb2_grpc
from router.migration import MigrationPolicy
from router.policy import RoutingConfig, make_policy
from router.registry import StaticRegistry
from router.server import Prepared, RouterServicer
from services.decode import mux
from services.decode.server import DecodeServicer
from services.engine import SamplingParams
from services.engine.async_engine import AsyncEngine
from services.engine.errors import UpstreamError
from services.rpc import metrics
from services.rpc.convert import params_to_proto
from services.rpc.server import start_server
from tests.conftest import assert_all_free, make_llm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
LONG_RUN = SamplingParams(temperature=0, max_tokens=480, ignore_eos=True)  # with prompt(i): < 512


def prompt(i: int) -> list[int]:
    return [(7 * i + k) % 250 + 3 for k in range(12 + i % 9)]  # 12..20 tokens: decode prefills locally


@pytest.fixture(scope="module")
def reference():
    """Greedy outputs of the in-process engine on the same dummy weights, for 200 prompts."""
    llm = make_llm("tiny-llama")
    return [c.outputs[0].token_ids for c in llm.generate([prompt(i) for i in range(200)], GREEDY)]


@pytest.fixture(scope="module")
def decode_llm():
    return make_llm("tiny-llama")


@pytest.fixture
def core(decode_llm):
    """The decode worker's engine core, shared by the module's tests (each leaves it empty)."""
    decode_llm.engine.block_manager.reset_prefix_cache()
    yield decode_llm.engine
    assert_all_free(decode_llm)


@contextlib.asynccontextmanager
async def served(core, stream_interval: int = 1, migration: MigrationPolicy = MigrationPolicy(),
                 older: bool = False):
    """A decode worker on `core` (the workers' server plumbing) and an in-process router in front of it;
    `older`: a worker of a version before GenerateStream (grpc answers that method UNIMPLEMENTED)."""
    engine = AsyncEngine(core=core)
    servicer = DecodeServicer(engine, "d", transport=None, stream_interval=stream_interval)
    add = add_without_generate_stream if older else worker_pb2_grpc.add_DecodeWorkerServicer_to_server
    server, _, port = await start_server([lambda s: add(servicer, s)], ["pdserve.v1.DecodeWorker"], "127.0.0.1", 0)
    registry = StaticRegistry({}, {"d": f"127.0.0.1:{port}"})
    router = RouterServicer(registry, make_policy("least_loaded", RoutingConfig()), None, "tiny", 512, 256,
                            migration=migration)
    try:
        yield SimpleNamespace(router=router, engine=engine, registry=registry)
    finally:
        await registry.close()
        await server.stop(0)
        router.close()
        engine.shutdown()


def add_without_generate_stream(servicer: DecodeServicer, server: grpc.aio.Server) -> None:
    """The DecodeWorker service as an older worker registers it: every method but GenerateStream."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    capture = SimpleNamespace(add_generic_rpc_handlers=lambda _: None,
                              add_registered_method_handlers=lambda _, h: handlers.update(h))
    worker_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, capture)
    del handlers["GenerateStream"]
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("pdserve.v1.DecodeWorker", handlers),))


def prepared(ids: list[int], params: SamplingParams, request_id: str) -> tuple[Prepared, router_pb2.GenerateRequest]:
    return Prepared(request_id, ids, params), router_pb2.GenerateRequest(sampling=params_to_proto(params))


async def tokens_of(router: RouterServicer, ids: list[int], params: SamplingParams = GREEDY, request_id: str = "r",
                    timeout: float | None = 120.0) -> list[int]:
    got: list[int] = []
    async for response in router.stream(*prepared(ids, params, request_id), timeout):
        for delta in response.outputs:
            got += delta.token_ids
    return got


async def all_free(engine: AsyncEngine, timeout: float = 10.0) -> None:
    """The engine holds no request and every KV block is free (cached-but-unused count as free)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        stats = engine.stats()
        if stats["requests"] == 0 and stats["free_kv_blocks"] == stats["total_kv_blocks"]:
            return
        assert asyncio.get_running_loop().time() < deadline, f"still held: {stats}"
        await asyncio.sleep(0.02)


def counters() -> tuple[float, float]:
    return metrics.STREAM_FRAMES._value.get(), metrics.STREAM_RESPONSES._value.get()


def test_a_step_of_many_requests_crosses_as_one_frame(core, reference):
    async def scenario():
        async with served(core) as s:
            frames, responses = counters()
            got = await asyncio.gather(*(tokens_of(s.router, prompt(i), request_id=f"r{i}") for i in range(16)))
            await all_free(s.engine)
            return got, counters()[0] - frames, counters()[1] - responses

    got, frames, responses = asyncio.run(scenario())
    assert got == reference[:16]
    tokens = sum(len(t) for t in got)
    assert responses == tokens  # --stream-interval 1: one response per token of each request
    assert frames < tokens / 2  # 16 requests decode together: their tokens share frames


def test_stream_interval_sends_a_requests_tokens_in_groups(core, reference):
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)

    async def scenario():
        async with served(core, stream_interval=4) as s:
            _, responses = counters()
            got = await tokens_of(s.router, prompt(0), params)
            await all_free(s.engine)
            return got, counters()[1] - responses

    got, responses = asyncio.run(scenario())
    assert got[:4] == reference[0] and len(got) == 9
    assert responses == 3  # the first token at once, then 4 and 4 (the last group ends with the request)


def test_two_hundred_concurrent_streams_arrive_complete_and_in_order(core, reference):
    async def scenario():
        async with served(core) as s:
            got = await asyncio.gather(*(tokens_of(s.router, prompt(i), request_id=f"r{i}") for i in range(200)))
            await all_free(s.engine)
            return got

    assert asyncio.run(scenario()) == reference


def test_a_client_that_stops_reading_does_not_stall_the_others(core, reference):
    async def scenario():
        async with served(core) as s:
            sleeper = s.router.stream(*prepared(prompt(0), SamplingParams(temperature=0, max_tokens=40,
                                                                           ignore_eos=True), "sleeper"), 120.0)
            first = await anext(sleeper)  # then it reads nothing while the others run
            others = await asyncio.wait_for(asyncio.gather(*(tokens_of(s.router, prompt(i), request_id=f"r{i}")
                                                             for i in range(1, 9))), 60)
            rest = [t for response in [first] + [r async for r in sleeper] for d in response.outputs
                    for t in d.token_ids]
            await all_free(s.engine)
            return others, rest

    others, rest = asyncio.run(scenario())
    assert others == reference[1:9]
    assert len(rest) == 40 and rest[:4] == reference[0]


def test_a_cancelled_request_frees_its_blocks_and_the_stream_goes_on(core, reference):
    async def scenario():
        async with served(core) as s:
            long = s.router.stream(*prepared(prompt(0), LONG_RUN, "long"), 120.0)
            await anext(long)
            await anext(long)
            await long.aclose()  # the client left: a cancel travels on the shared stream
            await all_free(s.engine)
            return await tokens_of(s.router, prompt(1))  # the same stream serves the next request

    assert asyncio.run(scenario()) == reference[1]


def test_a_deadline_ends_only_its_request_and_frees_its_blocks(core, reference):
    async def scenario():
        async with served(core) as s:
            slow = asyncio.ensure_future(tokens_of(s.router, prompt(0), LONG_RUN, "slow", timeout=0.05))
            fine = await tokens_of(s.router, prompt(1), request_id="fine")
            with pytest.raises(UpstreamError) as error:
                await slow
            await all_free(s.engine)
            return fine, error.value

    fine, error = asyncio.run(scenario())
    assert fine == reference[1]
    assert error.grpc_status == "DEADLINE_EXCEEDED"


def test_a_stream_that_goes_silent_breaks_every_request_on_it_and_frees_their_blocks(core, monkeypatch):
    """A frozen worker (here: its stream's writer never sends again) stalls the shared stream:
    each of its requests migrates (here back to the only instance, which freezes again) until
    the limit, then fails UNAVAILABLE; the router's cancel of each stream aborts its requests."""
    async def frozen(self) -> bool:
        await asyncio.get_running_loop().create_future()

    monkeypatch.setattr(mux.DecodeMux, "_wait", frozen)

    async def scenario():
        async with served(core, migration=MigrationPolicy(limit=1, stall_timeout=0.4)) as s:
            results = await asyncio.gather(*(tokens_of(s.router, prompt(i), LONG_RUN, f"r{i}") for i in range(4)),
                                           return_exceptions=True)
            await all_free(s.engine)
            return results

    results = asyncio.run(scenario())
    assert all(isinstance(r, UpstreamError) and r.grpc_status == "UNAVAILABLE" for r in results), results
    assert all("sent nothing" in str(r) for r in results), results


def test_a_worker_without_generate_stream_gets_a_generate_call_per_request(core, reference):
    """A rolling upgrade: a router meets a decode worker that predates GenerateStream. The
    requests started on the stream before its UNIMPLEMENTED came back go on Generate calls, as
    do later ones; cancel and deadlines still end them and free their blocks."""
    async def scenario():
        async with served(core, older=True) as s:
            frames, _ = counters()
            first = await asyncio.gather(*(tokens_of(s.router, prompt(i), request_id=f"r{i}") for i in range(8)))
            later = await tokens_of(s.router, prompt(8), request_id="r8")
            long = s.router.stream(*prepared(prompt(9), LONG_RUN, "long"), 120.0)
            await anext(long)
            await long.aclose()
            with pytest.raises(UpstreamError) as error:
                await tokens_of(s.router, prompt(10), LONG_RUN, "slow", timeout=0.05)
            await all_free(s.engine)
            (instance,) = s.registry.decodes()
            return first, later, counters()[0] - frames, instance.stream.per_request, error.value

    first, later, frames, per_request, error = asyncio.run(scenario())
    assert first == reference[:8] and later == reference[8]
    assert frames == 0 and per_request
    assert error.grpc_status == "DEADLINE_EXCEEDED"
