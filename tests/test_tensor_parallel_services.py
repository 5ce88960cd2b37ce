"""`pdserve serve --tensor-parallel-size 2` end to end: router + prefill + decode, each worker's
engine on two ranks (gloo). Tokens equal the in-process single-rank engine, shipped blocks
carry every KV head, every block comes back; a killed rank takes its worker down."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import grpc
import pytest

from services.cli.stack import LocalStack
from services.engine import SamplingParams
from tests.conftest import make_llm
from tests.test_services import LONG, MODEL, SHORT, expected_tokens, generate, request, wait_all_free

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = LocalStack([*MODEL, "--tensor-parallel-size", "2"], num_prefill=1, num_decode=1,
                   log_dir=tmp_path_factory.mktemp("tp-stack"))
    s.start(timeout=300)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def router(stack):
    from pdserve.v1 import router_pb2_grpc

    channel = grpc.insecure_channel(stack.router_address)
    yield router_pb2_grpc.RouterStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def reference():
    return make_llm("tiny-llama")


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents before children (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rpartition(")")[2].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def test_local_and_remote_prefill_give_the_in_process_tokens(stack, router, reference):
    short = generate(router, SHORT)
    assert short.completions[0].token_ids == expected_tokens(reference, SHORT)[0]
    assert not short.disaggregation.remote_prefill
    long = generate(router, LONG)
    assert long.completions[0].token_ids == expected_tokens(reference, LONG)[0]
    d = long.disaggregation
    assert d.remote_prefill and d.decode_computed_prompt_tokens == 0
    # every KV head of the 150 tokens crossed, gathered from both of prefill's ranks
    assert d.kv_blocks_shipped == 10 and d.kv_bytes_shipped == 150 * 2 * 2 * 2 * 16 * 4
    wait_all_free(stack)


def test_each_worker_runs_its_engine_on_two_ranks(stack):
    for worker in (*stack.prefills, *stack.decodes):
        cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes() for p in descendants(worker.proc.pid)]
        assert sum(b"services.engine.parallel.follower" in c for c in cmdlines) == 1, cmdlines


def follower_of(worker) -> int:
    [rank1] = [p for p in descendants(worker.proc.pid) if b"parallel.follower" in Path(f"/proc/{p}/cmdline").read_bytes()]
    return rank1


def test_a_killed_rank_errors_the_streams_and_takes_its_worker_down(stack, router):
    """Last: it ends the stack's workers (decode busy, prefill idle)."""
    decode = stack.decodes[0]
    rank1 = follower_of(decode)
    params = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
    call = router.Generate(request(SHORT, params), timeout=120)
    next(call)  # in flight
    os.kill(rank1, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as failure:
        for _ in call:
            pass
    assert failure.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
    assert decode.proc.wait(60) != 0
    prefill = stack.prefills[0]
    os.kill(follower_of(prefill), signal.SIGKILL)  # no request in flight: the worker learns at once
    assert prefill.proc.wait(60) != 0
    assert "parallel rank 1 exited" in prefill.log_tail()
