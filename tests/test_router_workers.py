"""`--router-workers 2` (issue #32, part 4): two router processes behind one gRPC port and one
HTTP port (router/workers.py), in a real stack (one decode worker that prefills, tiny dummy
model). Which process served a request shows in pdserve:router_process_requests{pid}; every
other metric is one sum over both, whichever process a scrape reaches. The tests run in file
order: the last one stops the router.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from pdserve.v1 import router_pb2_grpc
from router.workers import reuse_port_socket, worker_namespace
from services.cli.main import build_parser
from services.cli.stack import LocalStack
from services.engine import SamplingParams
from tests.test_services import MODEL, request, wait_all_free

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
PROMPT = list(range(100, 120))
CONNECTIONS = 16  # per batch, each its own TCP connection: 2 workers all get some but with odds 2^-15


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = LocalStack(MODEL, num_prefill=0, num_decode=1, log_dir=tmp_path_factory.mktemp("stack"),
                   router_argv=["--router-workers", "2", "--grace", "5"])
    s.start(timeout=300)
    yield s
    s.stop()


def process_requests(stack: LocalStack) -> dict[int, float]:
    """pid -> requests that router worker took, from one scrape (any worker answers it)."""
    text = _metrics(stack)
    return {int(pid): float(v) for pid, v in
            re.findall(r'^pdserve:router_process_requests\{[^}]*\bpid="(\d+)"[^}]*\} (\S+)$', text, re.MULTILINE)}


def _metrics(stack: LocalStack) -> str:
    return urllib.request.urlopen(f"http://{stack.host}:{stack.http_port}/metrics", timeout=10).read().decode()


def finished(stack: LocalStack) -> float:
    match = re.search(r'^pdserve:request_success_total\{[^}]*\bfinished_reason="length"[^}]*\} (\S+)$', _metrics(stack),
                      re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def grpc_once(stack: LocalStack) -> int:
    """One request on a connection of its own (a local subchannel pool: no connection shared
    with other channels); the number of tokens it got."""
    with grpc.insecure_channel(stack.router_address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        responses = router_pb2_grpc.RouterStub(channel).Generate(request(PROMPT, PARAMS), timeout=60)
        return sum(len(c.token_ids) for r in responses for c in r.outputs)


@functools.cache
def served_model(http_port: int) -> str:
    models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models", timeout=10).read())
    return models["data"][0]["id"]


def http_once(stack: LocalStack) -> int:
    """One /v1/completions request (urllib: a new connection, closed after it)."""
    body = json.dumps({"model": served_model(stack.http_port), "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(f"http://{stack.host}:{stack.http_port}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    reply = json.loads(urllib.request.urlopen(req, timeout=60).read())
    return reply["usage"]["completion_tokens"]


def with_retry(send, stack: LocalStack, attempts: int = 3) -> int:
    """`send`, again after UNAVAILABLE or a reset connection (a worker killed under it)."""
    for attempt in range(attempts):
        try:
            return send(stack)
        except (grpc.RpcError, OSError) as e:
            if attempt + 1 == attempts or (isinstance(e, grpc.RpcError) and e.code() != grpc.StatusCode.UNAVAILABLE):
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def served_by_both(stack: LocalStack, send, timeout: float = 60.0) -> dict[int, float]:
    """Batches of CONNECTIONS concurrent requests until both workers took some (a worker that
    is still starting takes no connection: only listening sockets do). Every request must get
    all its tokens; returns pid -> requests taken, which add up to the requests sent."""
    before, sent = process_requests(stack), 0
    deadline = time.monotonic() + timeout
    with concurrent.futures.ThreadPoolExecutor(CONNECTIONS) as pool:
        while True:
            assert list(pool.map(lambda _: send(stack), range(CONNECTIONS))) == [PARAMS.max_tokens] * CONNECTIONS
            sent += CONNECTIONS
            after = process_requests(stack)
            served = {pid: after[pid] - before.get(pid, 0.0) for pid in after}
            if sum(1 for n in served.values() if n > 0) == 2:
                break
            assert time.monotonic() < deadline, f"one worker took every request: {served}"
    assert sum(served.values()) == sent
    return served


def wait_workers(stack: LocalStack, count: int = 2, without: set[int] = frozenset(), timeout: float = 60.0) -> list[int]:
    """The router's live workers, once there are `count` of them, children of the router's
    process, none of them in `without`."""
    deadline = time.monotonic() + timeout
    while True:
        pids = sorted(process_requests(stack))
        if len(pids) == count and not without & set(pids):
            assert all(parent_of(pid) == stack.router.proc.pid for pid in pids)
            return pids
        assert time.monotonic() < deadline, f"router workers {pids}, wanted {count} without {without}"
        time.sleep(0.2)


# ---- without a stack -----------------------------------------------------------------------------


def test_a_reserving_socket_holds_the_port_but_every_connection_goes_to_the_listeners():
    held = reuse_port_socket("127.0.0.1", 0)
    port = held.getsockname()[1]
    listener = reuse_port_socket("127.0.0.1", port)
    listener.listen(64)
    listener.settimeout(5)
    try:
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                listener.accept()[0].close()
        with pytest.raises(OSError):  # a socket without SO_REUSEPORT: the port is taken
            socket.create_server(("127.0.0.1", port))
    finally:
        listener.close()
        held.close()


def test_every_worker_gets_the_parents_security_flags_and_one_concrete_port_each():
    args = build_parser().parse_args(["router", "--router-workers", "2", "--port", "0", "--api-key", "k1",
                                      "--api-key-file", "/keys", "--tls-cert", "c.pem", "--tls-key", "k.pem",
                                      "--internal-tls", "/internal", "--metrics-without-auth"])
    worker = pickle.loads(pickle.dumps(worker_namespace(args, {"port": 50123, "http_port": 8123})))  # as spawn sends it
    assert (worker.port, worker.http_port) == (50123, 8123)
    assert {k: v for k, v in vars(worker).items() if k not in ("port", "http_port")} == \
        {k: v for k, v in vars(args).items() if k not in ("port", "http_port", "run")}
    assert (worker.api_key, str(worker.api_key_file), worker.internal_tls) == (["k1"], "/keys", "/internal")


def test_pdserve_serve_passes_router_workers_to_its_router():
    args = build_parser().parse_args(["serve", "--router-workers", "3", "--redis", "redis://127.0.0.1:1/0"])
    stack = LocalStack.from_args(args)
    try:
        router_args = build_parser().parse_args(stack.router.argv[stack.router.argv.index("--log-level"):])
        assert router_args.command == "router" and router_args.router_workers == 3
    finally:
        stack.stop()


def test_a_worker_that_cannot_start_stops_the_group_without_restarts(tmp_path):
    missing = tmp_path / "missing.pem"
    proc = subprocess.run([sys.executable, "-m", "services.cli.main", "router", "--router-workers", "2", "--port", "0",
                           "--http-port", "0", "--tls-cert", str(missing), "--tls-key", str(missing),
                           "--decode-peers", "decode-0=127.0.0.1:1", *MODEL],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "before it served; stopping" in proc.stderr and "restarting" not in proc.stderr


# ---- a stack whose router has two workers ------------------------------------------------------------


def test_both_workers_serve_grpc_and_http_on_one_port_each_and_metrics_are_summed(stack):
    wait_workers(stack)
    before = finished(stack)
    served = served_by_both(stack, grpc_once)
    served_http = served_by_both(stack, http_once)
    # A scrape reaches one worker, yet counts what both finished.
    assert finished(stack) - before == sum(served.values()) + sum(served_http.values())
    wait_all_free(stack)


def test_a_killed_worker_is_replaced_and_requests_succeed_meanwhile(stack):
    victim, survivor = wait_workers(stack)
    stop, results, errors = threading.Event(), [], []

    def load() -> None:
        while not stop.is_set():
            try:
                results.append(with_retry(grpc_once, stack))
            except Exception as e:  # noqa: BLE001 - counted: the test asserts there are none
                errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 4)
        os.kill(victim, signal.SIGKILL)
        after_kill = len(results)
        wait_for(lambda: len(results) >= after_kill + 8 or errors)  # the survivor took them
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == [] and set(results) == {PARAMS.max_tokens}
    pids = wait_workers(stack, without={victim})  # the parent started another; the victim's series left
    assert survivor in pids and stack.router.alive()
    wait_all_free(stack)


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_sigterm_drains_every_worker_and_a_stream_in_flight_completes(stack):
    pids = wait_workers(stack)
    tokens: list[int] = []
    first = threading.Event()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    def stream() -> None:
        with grpc.insecure_channel(stack.router_address) as channel:
            for response in router_pb2_grpc.RouterStub(channel).Generate(request(PROMPT, params), timeout=60):
                tokens.extend(t for c in response.outputs for t in c.token_ids)
                first.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert first.wait(30)
    stack.router.proc.send_signal(signal.SIGTERM)
    thread.join(30)
    assert len(tokens) == params.max_tokens
    assert stack.router.proc.wait(30) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)  # no orphan keeps a share of the port
    wait_all_free(stack)
