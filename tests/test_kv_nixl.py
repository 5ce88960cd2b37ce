"""The NIXL KV transport (services/kv/nixl.py) on the CPU: a prefill and a decode worker as real
processes whose NIXL agents move blocks pool to pool over UCX, the gRPC stream carrying only
control. Checked: the tokens equal the in-process engine's, blocks really travel over NIXL,
every block is back in both pools (the prefill's held slots released), a killed and restarted
prefill worker costs one recomputed request and is then handshaken again, and metadata that
does not describe a usable pool is refused (bytes over gRPC instead)."""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
import time

import pytest
import torch

from pdserve.v1 import engine_pb2, kv_pb2
from services.cli.stack import Child
from services.engine.kv_transfer import BlockRef
from services.kv import nixl, nixl_agent
from services.kv.nixl_core import CoreReads, ref_from_proto, ref_to_proto
from services.kv.cuda_ipc import PoolError
from services.kv.wire import KVWireError
from tests.conftest import make_llm
from tests.test_services import (decode_directly, expected_tokens, kv_faults, spawn, stop, wait_serving,
                                 wait_workers_free)

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]

PROMPT = list(range(2000, 2150))  # 150 tokens: 10 blocks read over NIXL
BLOCK_SHAPE = (2, 2, 16, 2, 16)  # [layers, 2, block_size, kv_heads, head_dim]


@pytest.fixture(scope="module")
def reference():
    return make_llm("tiny-llama")


@pytest.fixture(scope="module", params=["core-process", "in-thread"])
def workers(request, tmp_path_factory):
    """A prefill and a decode worker, their engine cores in their own processes (the agents there,
    beside the pools: services/kv/nixl_core.py) or in the workers' processes (in a thread)."""
    tmp = tmp_path_factory.mktemp("nixl")
    # A small pool (registered whole with NIXL: no need for the default 1 GiB), a short drain.
    small = ["--kv-cache-memory", "64MiB", "--grace", "1",
             "--engine-process", "on" if request.param == "core-process" else "off"]
    prefill = spawn(tmp, "prefill", ["--kv-transport", "nixl", *small])
    decode = spawn(tmp, "decode", ["--kv-transport", "nixl", *small, "--prefill-peers", f"p={prefill.address}",
                                   "--kv-progress-timeout", "10"])
    try:
        wait_serving(prefill)
        wait_serving(decode)
        yield prefill, decode
    finally:
        stop(decode)
        stop(prefill)


def restart(child: Child, env: dict | None = None) -> None:
    """Start `child` again on its address, as a supervisor would."""
    stop(child)
    child.start({**os.environ, **(env or {})})
    wait_serving(child)


def test_blocks_move_over_nixl_and_tokens_equal_the_in_process_run(workers, reference):
    prefill, decode = workers
    result = decode_directly(decode, PROMPT, "p")
    d = result.disaggregation
    assert (d.remote_prefill, d.kv_transport, d.decode_computed_prompt_tokens) == (True, "nixl", 0)
    assert d.kv_blocks_shipped == 10
    assert result.completions[0].token_ids == expected_tokens(reference, PROMPT)[0]
    wait_workers_free([prefill, decode])  # the prefill's held slots were released too
    core_process = "--engine-process on" in " ".join(prefill.argv)
    for child in (prefill, decode):  # the agent (UCX's backend) lives where the pool is
        cores = children_of(child.proc.pid)
        assert len(cores) == (1 if core_process else 0)
        assert [uses_ucx(pid) for pid in [child.proc.pid, *cores]] == ([False, True] if core_process else [True])


def children_of(pid: int) -> list[int]:
    return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]


def uses_ucx(pid: int) -> bool:
    """Whether process `pid` started a NIXL agent: only that loads NIXL's UCX backend."""
    return any("libplugin_UCX" in line for line in open(f"/proc/{pid}/maps"))


def until(decode, reference, want: tuple[str, int], first: int) -> list[tuple[str, int]]:
    """Fresh prompts through `decode` until one's (kv_transport, decode_computed_prompt_tokens)
    is `want`; every answer has the in-process tokens. Returns what each pull did."""
    deadline = time.monotonic() + 90
    kinds: list[tuple[str, int]] = []
    while not kinds or kinds[-1] != want:
        assert time.monotonic() < deadline, kinds
        prompt = [t + len(kinds) for t in range(first, first + 150)]
        result = decode_directly(decode, prompt, "p")
        kinds.append((result.disaggregation.kv_transport, result.disaggregation.decode_computed_prompt_tokens))
        assert result.completions[0].token_ids == expected_tokens(reference, prompt)[0]
        time.sleep(0.5)  # gRPC may still be backing off from the dead peer
    return kinds


def kill_and_pull(prefill, decode, reference, first: int) -> None:
    """Kill the prefill worker; a pull then fails and decode prefills the prompt itself."""
    prefill.proc.kill()
    prefill.proc.wait(20)
    lost = list(range(first, first + 150))
    result = decode_directly(decode, lost, "p")
    assert result.disaggregation.decode_computed_prompt_tokens == len(lost)
    assert result.completions[0].token_ids == expected_tokens(reference, lost)[0]


def test_a_killed_peer_falls_back_and_a_restarted_one_is_handshaken_again(workers, reference):
    prefill, decode = workers
    kill_and_pull(prefill, decode, reference, 3000)
    # Restarted announcing metadata NIXL cannot load: the handshake refuses it, bytes instead.
    restart(prefill, kv_faults("PDSERVE_TEST_BAD_NIXL_METADATA"))
    until(decode, reference, ("grpc", 0), 4000)
    wait_workers_free([prefill, decode])
    # Killed and restarted intact: handshaken again, over NIXL again.
    kill_and_pull(prefill, decode, reference, 5000)
    restart(prefill)
    until(decode, reference, ("nixl", 0), 6000)
    wait_workers_free([prefill, decode])


# ---- the handshake's checks, in process ----------------------------------------------------


@pytest.fixture(scope="module")
def pool_and_reader():
    """A pool of 4 blocks registered with one agent, a reader with another (one process)."""
    pool = torch.arange(BLOCK_SHAPE[0] * 2 * 4 * 16 * 2 * 16, dtype=torch.float32).reshape(
        BLOCK_SHAPE[0], 2, 4, *BLOCK_SHAPE[2:])
    registered = nixl.register_pool(nixl.new_agent("prefill", "t"), pool)
    reader = nixl.PoolReader(nixl.new_agent("decode", "t"), torch.device("cpu"), BLOCK_SHAPE, torch.float32)
    yield registered.announcement, reader, pool
    del registered  # the owner's agent (its UCX endpoint) lives until here


def tampered(msg: kv_pb2.NixlPool, **fields) -> kv_pb2.NixlPool:
    copy = kv_pb2.NixlPool()
    copy.CopyFrom(msg)
    for name, value in fields.items():
        if isinstance(value, list):
            del getattr(copy, name)[:]
            getattr(copy, name).extend(value)
        else:
            setattr(copy, name, value)
    return copy


@pytest.mark.parametrize("fields, reason", [
    ({"agent_metadata": b""}, "no NIXL agent metadata"),
    ({"agent_metadata": secrets.token_bytes(512)}, "NIXL refused"),
    ({"dtype": "bfloat16"}, "dtype"),
    ({"shape": [2, 2, 4, 16, 2, 8]}, "does not hold blocks"),
    ({"stride": [2048, 1024, 256, 32, 1, 16]}, "not contiguous"),
    ({"storage_bytes": 1024}, "overruns"),
    ({"memory": "FILE"}, "memory kind"),
    ({"agent_name": "someone-else"}, "names agent"),
])
def test_a_pool_announcement_that_does_not_fit_is_refused(pool_and_reader, fields, reason):
    msg, reader, _ = pool_and_reader
    with pytest.raises(PoolError, match=reason):
        reader.load(tampered(msg, **fields))


def test_a_read_copies_exactly_the_named_slots_tokens_and_layers(pool_and_reader):
    msg, reader, pool = pool_and_reader
    remote = reader.load(msg)
    assert remote.agent == msg.agent_name
    staging, registration = reader.staging(3)
    try:
        refs = [BlockRef(5, None, 7, 3), BlockRef(6, 11, 16, 0)]  # a partial block from slot 3, a full one
        blocks = asyncio.run(reader.read(remote, refs, staging, 1, timeout=30))
        with pytest.raises(KVWireError, match="outside"):
            asyncio.run(reader.read(remote, [BlockRef(7, None, 1, 4)], staging, 0, timeout=30))
        with pytest.raises(KVWireError, match="more blocks"):
            asyncio.run(reader.read(remote, refs, staging, 2, timeout=30))
    finally:
        reader.release(registration)
        reader.unload(remote)
    assert [(b.block_index, b.block_hash) for b in blocks] == [(5, None), (6, 11)]
    assert torch.equal(blocks[0].tensor, pool[:, :, 3, :7]) and torch.equal(blocks[1].tensor, pool[:, :, 0])


def test_ucx_binds_loopback_for_a_loopback_worker(monkeypatch):
    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    assert nixl.bind_ucx("127.0.0.1") == "lo"
    monkeypatch.setenv("UCX_NET_DEVICES", "eth9")
    assert nixl.bind_ucx("localhost") == "eth9"  # an explicit choice wins


# ---- the engine core's side of the channel (services/kv/nixl_core.py), in process --------------


def test_the_core_loads_reads_into_the_request_and_answers_each_command(pool_and_reader):
    msg, _, pool = pool_and_reader
    core_reader = nixl_agent.PoolReader(nixl.new_agent("decode", "core"), torch.device("cpu"), BLOCK_SHAPE,
                                        torch.float32)
    answers, placed, done = {}, [], threading.Event()

    def answer(a):
        answers[a.id] = a
        if len(answers) == 6:
            done.set()

    reads = CoreReads(core_reader, lambda request_id, block: placed.append((request_id, block)), answer)
    refs = [BlockRef(5, None, 7, 3), BlockRef(6, 11, 16, 0)]
    commands = [
        engine_pb2.CoreCommand(nixl_load=engine_pb2.CoreNixlLoad(id=1, pool=tampered(msg, dtype="bfloat16"))),
        engine_pb2.CoreCommand(nixl_read=engine_pb2.CoreNixlRead(id=2, request_id="r", agent_name=msg.agent_name,
                                                                 num_blocks=3, refs=[ref_to_proto(r) for r in refs])),
        engine_pb2.CoreCommand(nixl_load=engine_pb2.CoreNixlLoad(id=3, pool=msg)),
        engine_pb2.CoreCommand(nixl_read=engine_pb2.CoreNixlRead(id=4, request_id="r", agent_name=msg.agent_name,
                                                                 first=1, num_blocks=3, timeout_s=30,
                                                                 refs=[ref_to_proto(r) for r in refs])),
        engine_pb2.CoreCommand(nixl_read=engine_pb2.CoreNixlRead(
            id=5, request_id="r", agent_name=msg.agent_name, first=0, num_blocks=3,
            refs=[ref_to_proto(BlockRef(7, None, 1, 4))])),  # slot 4 of a 4-slot pool
        engine_pb2.CoreCommand(nixl_read=engine_pb2.CoreNixlRead(
            id=6, request_id="r", agent_name=msg.agent_name, first=0, num_blocks=3,
            refs=[ref_to_proto(BlockRef(7, None, 17, 1))])),  # more tokens than a block holds
    ]
    for command in commands:
        reads.submit(command)
    assert done.wait(60), answers
    reads.submit(engine_pb2.CoreCommand(nixl_end="r"))
    reads.submit(engine_pb2.CoreCommand(nixl_unload=msg.agent_name))
    assert "dtype" in answers[1].error and "no NIXL agent" in answers[2].error
    assert answers[3].error == "" and answers[4].error == ""
    assert "outside" in answers[5].error and "tokens in blocks of 16" in answers[6].error
    assert [(r, b.block_index, b.block_hash) for r, b in placed] == [("r", 5, None), ("r", 6, 11)]
    assert torch.equal(placed[0][1].tensor, pool[:, :, 3, :7]) and torch.equal(placed[1][1].tensor, pool[:, :, 0])


def test_block_refs_cross_the_core_channel_unchanged():
    scales = torch.tensor([[0.5, 0.25], [2.0, 4.0]])
    for ref in (BlockRef(3, None, 5, 9), BlockRef(4, 2**63 + 5, 16, 0, scales)):
        back = ref_from_proto(engine_pb2.CoreBlockRef.FromString(ref_to_proto(ref).SerializeToString()))
        assert (back.block_index, back.block_hash, back.num_tokens, back.pool_block) == \
            (ref.block_index, ref.block_hash, ref.num_tokens, ref.pool_block)
        assert (back.scales is None) if ref.scales is None else torch.equal(back.scales, scales)
