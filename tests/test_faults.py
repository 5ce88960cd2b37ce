"""The fault suite (issue #25): real processes on the CPU, tiny dummy model, faults under load.

One supervised stack is shared by the module (router + 1 prefill + 1 decode, a private Redis),
supervised as `pdserve serve` supervises its own (LocalStack.supervise, in a thread): a child
that dies is restarted, and so is Redis. Faults inside a worker come from tests/engine_faults (a
sitecustomize on the children's PYTHONPATH), never from a switch in the product.

Each case counts lost requests (an error, or tokens other than a fault-free run's) and prints,
never asserts, how long recovery took; after each, every KV pool is full again. The tests run in
file order.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import random
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.v1 import router_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.cli.stack import Child, LocalStack, RestartPolicy
from services.engine import SamplingParams
from tests.test_routing import decisions, router_metric
from tests.test_services import MODEL, request, wait_all_free

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

REPO = Path(__file__).resolve().parents[1]
GRACE = 3.0  # --grace of every process: what "fits in the grace period" means below
STEP_TOKENS = 128  # the step budget, scaled down with the model: a 500-token prompt takes 4 steps
STREAMS = 8  # concurrent streaming requests of the steady load
PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
# Short prompts prefill on decode, long ones (> 64 uncached tokens) on the prefill worker.
PROMPTS = [list(range(100 + 7 * i, 120 + 7 * i)) for i in range(4)] + \
          [list(range(3000 + 11 * i, 3150 + 11 * i)) for i in range(4)]


@pytest.fixture(scope="module")
def fault_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def stack(fault_dir, tmp_path_factory):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "protos"), str(REPO / "tests" / "engine_faults")]),
           "PDSERVE_FAULT_DIR": str(fault_dir)}
    s = LocalStack([*MODEL, "--grace", str(GRACE)], num_prefill=1, num_decode=1,
                   log_dir=tmp_path_factory.mktemp("stack"), env=env,
                   worker_argv=["--max-num-batched-tokens", str(STEP_TOKENS)])
    s.start(timeout=300)
    stop = threading.Event()
    errors: list[BaseException] = []

    def supervise() -> None:
        try:
            s.supervise(stop, RestartPolicy(backoff_s=0.2, crash_loop_restarts=10))
        except BaseException as e:  # noqa: BLE001 - reported by the test that comes next
            errors.append(e)

    thread = threading.Thread(target=supervise, name="supervisor", daemon=True)
    thread.start()
    yield s
    stop.set()
    thread.join()
    s.stop()
    assert not errors, errors


@pytest.fixture(scope="module")
def reference(stack) -> dict[int, list[int]]:
    """Each prompt's tokens in a fault-free run."""
    stub = router(stack)
    return {i: _tokens(stub.Generate(request(p, PARAMS), timeout=60)) for i, p in enumerate(PROMPTS)}


def router(stack: LocalStack):
    return router_pb2_grpc.RouterStub(grpc.insecure_channel(stack.router_address))


def _tokens(responses) -> list[int]:
    tokens: list[int] = []
    for response in responses:
        for c in response.outputs:
            tokens += c.token_ids
    return tokens


@dataclass
class Load:
    """`streams` threads, each sending streaming requests back to back until stopped."""

    stack: LocalStack
    reference: dict[int, list[int]]
    streams: int = STREAMS
    params: SamplingParams = PARAMS
    results: list[tuple[int, str]] = field(default_factory=list)  # (prompt, "ok" | "wrong" | status name)
    _stop: threading.Event = field(default_factory=threading.Event)
    _pool: concurrent.futures.ThreadPoolExecutor | None = None

    def __enter__(self) -> Load:
        self._pool = concurrent.futures.ThreadPoolExecutor(self.streams)
        self._futures = [self._pool.submit(self._run, i) for i in range(self.streams)]
        return self

    def _run(self, worker: int) -> None:
        stub = router(self.stack)
        for n in itertools.count(worker):
            if self._stop.is_set():
                return
            i = n % len(PROMPTS)
            try:
                tokens = _tokens(stub.Generate(request(PROMPTS[i], self.params), timeout=60))
                self.results.append((i, "ok" if tokens == self.reference[i] else "wrong"))
            except grpc.RpcError as e:
                self.results.append((i, e.code().name))

    def wait_for(self, completed: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.results) < completed:
            assert time.monotonic() < deadline, f"only {len(self.results)} requests completed"
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for f in self._futures:
            f.result()
        self._pool.shutdown()

    @property
    def lost(self) -> list[tuple[int, str]]:
        return [r for r in self.results if r[1] != "ok"]


def wait_until(predicate, what: str, timeout: float = 30.0) -> float:
    """Poll `predicate` until true; the seconds it took (reported, never asserted)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"never: {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def serving(child: Child) -> bool:
    try:
        with child.health_channel() as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def healthz(stack: LocalStack) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{stack.http_port}/health", timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def answers(stack: LocalStack) -> bool:
    try:
        router(stack).Generate(request(PROMPTS[0], PARAMS), timeout=10).__next__()
    except grpc.RpcError:
        return False
    return True


def pools_full(stack: LocalStack) -> None:
    wait_all_free(stack, timeout=30)


def report(case: str, load: Load, recovery_s: float | None = None) -> None:
    extra = f", recovered in {recovery_s:.2f}s" if recovery_s is not None else ""
    print(f"\n[fault] {case}: {len(load.results)} requests, {len(load.lost)} lost{extra}")


# ---- Redis ---------------------------------------------------------------------------------------


def test_frozen_redis_loses_no_request_stays_serving_and_prefix_routing_returns(stack, reference):
    redis = stack.redis.proc
    with Load(stack, reference) as load:
        load.wait_for(8)
        os.kill(redis.pid, signal.SIGSTOP)
        try:
            noticed = wait_until(lambda: router_metric(stack, "pdserve:redis_up") == 0, "redis_up reads 0")
            load.wait_for(len(load.results) + 16)  # requests keep completing, routed on load alone
            status, body = healthz(stack)
            assert (status, body["status"], body["redis"]) == (200, "degraded", "down")
            assert serving(stack.router) and all(serving(c) for c in [*stack.prefills, *stack.decodes])
        finally:
            os.kill(redis.pid, signal.SIGCONT)
        back = wait_until(lambda: router_metric(stack, "pdserve:redis_up") == 1, "redis_up reads 1")
        load.wait_for(len(load.results) + 8)
    assert load.lost == []
    assert healthz(stack)[1]["status"] == "ok"
    hits = decisions(stack, "prefix_hit")
    wait_until(lambda: answers(stack) and decisions(stack, "prefix_hit") > hits, "prefix hits again")
    report("Redis SIGSTOP", load, noticed + back)
    pools_full(stack)


def test_redis_killed_and_restarted_loses_no_request(stack, reference):
    with Load(stack, reference) as load:
        load.wait_for(8)
        stack.redis.kill()  # the supervisor starts it again, empty
        recovery = wait_until(lambda: stack.redis.alive() and router_metric(stack, "pdserve:redis_up") == 1,
                              "Redis back and read by the router")
        stack.wait_registered([*stack.prefills, *stack.decodes], timeout=30)
        load.wait_for(len(load.results) + 16)
    assert load.lost == []
    report("Redis SIGKILL + restart", load, recovery)
    pools_full(stack)


# ---- bounded steps: deadlines and cancels ----------------------------------------------------------


def decode_stub(child: Child):
    return worker_pb2_grpc.DecodeWorkerStub(child.channel())


def trace(fault_dir: Path, child: Child) -> list[dict]:
    path = fault_dir / f"trace.{child.instance_id}"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_deadline_on_a_long_prefill_frees_its_blocks_at_the_next_step(stack, fault_dir):
    decode = stack.decodes[0]
    seen = len(trace(fault_dir, decode))
    sleep = fault_dir / f"step-sleep.{decode.instance_id}"
    sleep.write_text("0.5")  # a slow CPU: 4 chunks of 128 tokens take 2 s; the deadline comes after 1
    prompt = list(range(5000, 5500))
    message = worker_pb2.DecodeRequest(request_id="long-prefill", prompt_token_ids=prompt,
                                       sampling=request(prompt, SamplingParams(max_tokens=4)).sampling)
    try:
        with pytest.raises(grpc.RpcError) as failed:
            list(decode_stub(decode).Generate(message, timeout=1.0))
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: any("abort" in e and e["abort"].endswith("long-prefill")
                               for e in trace(fault_dir, decode)[seen:]), "the engine aborts it")
    finally:
        sleep.unlink()
    pools_full(stack)
    events = trace(fault_dir, decode)[seen:]
    aborted = next(i for i, e in enumerate(events) if e.get("abort", "").endswith("long-prefill"))
    mine = [i for i, e in enumerate(events) if any(r.endswith("long-prefill") for r in e.get("step", ()))]
    assert mine and max(mine) < aborted  # no step after the abort computes it ...
    assert len(mine) < -(-len(prompt) // STEP_TOKENS)  # ... and it was stopped mid-prefill
    assert all(e["tokens"] <= STEP_TOKENS for e in events if "step" in e)
    print(f"\n[fault] deadline: {len(mine)} of 4 prefill chunks ran; aborted "
          f"{events[aborted]['t'] - events[mine[-1]]['t']:.2f}s after its last step began")


def test_a_cancel_storm_gives_every_block_back(stack):
    stub = router(stack)
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)

    def cancelled_at_a_random_point(i: int) -> str:
        call = stub.Generate(request(PROMPTS[i % len(PROMPTS)], params), timeout=60)
        after = rng.randrange(0, 20)  # tokens to read first (0: cancel before the first one)
        try:
            for n, _ in enumerate(call):
                if n >= after:
                    break
        except grpc.RpcError as e:
            return e.code().name
        call.cancel()
        return "cancelled"

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(cancelled_at_a_random_point, range(100)))
    assert outcomes.count("cancelled") == 100
    pools_full(stack)


# ---- engine death --------------------------------------------------------------------------------


def test_an_engine_step_that_raises_fails_every_stream_at_once_and_the_worker_restarts(stack, fault_dir, reference):
    decode = stack.decodes[0]
    pid = decode.proc.pid
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    stub = router(stack)
    calls = [stub.Generate(request(PROMPTS[i % 4], long), timeout=60) for i in range(STREAMS)]
    for call in calls:
        next(call)  # every stream is in flight
    (fault_dir / f"step-raises.{decode.instance_id}").touch()
    codes = []
    for call in calls:
        try:
            for _ in call:
                pass
            codes.append("OK")
        except grpc.RpcError as e:
            codes.append(e.code().name)
    failed_at = time.monotonic()
    wait_until(lambda: decode.proc.pid != pid and decode.proc.poll() is None, "the worker is restarted")
    stack.wait_registered(stack.decodes, timeout=60)
    # Each ends with its own failure, INTERNAL: the router has no other decode instance to move it
    # to, and the retries that found the worker gone are not what the client is told (router/migration.py).
    assert codes == ["INTERNAL"] * STREAMS, codes
    recovery = wait_until(lambda: answers(stack), "requests succeed again", timeout=60)
    with Load(stack, reference) as load:
        load.wait_for(16)
    assert load.lost == []
    report("engine step raises (one decode)", load, time.monotonic() - failed_at)
    print(f"[fault] first request served {recovery:.2f}s after the worker came back")
    pools_full(stack)
    # With two decode instances the streams move instead: tests/test_faults_migration.py.


# ---- drain on SIGTERM ------------------------------------------------------------------------------


def _drain_case(stack: LocalStack, child: Child, fault_dir: Path, reference) -> None:
    """SIGTERM `child` with streams in flight: those that fit in the grace complete, one that
    cannot ends with UNAVAILABLE; the supervisor then restarts the child."""
    pid = child.proc.pid
    stub = router(stack)
    slow = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    sleep = fault_dir / f"step-sleep.{stack.decodes[0].instance_id}"
    sleep.write_text("0.02")  # 400 tokens take 8 s or more: past the grace of 3 s
    try:
        too_long = stub.Generate(request(PROMPTS[0], slow), timeout=60)
        next(too_long)
        calls = [stub.Generate(request(PROMPTS[i], PARAMS), timeout=60) for i in range(STREAMS)]
        firsts = [_tokens([next(call)]) for call in calls]  # every stream is in flight
        http = concurrent.futures.ThreadPoolExecutor(1).submit(_http_completion, stack) \
            if child.role == "router" else None
        if http is not None:  # an HTTP request in flight too (the router drains both ports)
            decode = decode_stub(stack.decodes[0])
            wait_until(lambda: decode.GetLoad(worker_pb2.LoadRequest(), timeout=5).requests >= STREAMS + 2,
                       "the HTTP request is on the decode worker")
        child.proc.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        results = []
        for i, call in enumerate(calls):
            try:
                results.append("ok" if firsts[i] + _tokens(call) == reference[i] else "wrong")
            except grpc.RpcError as e:
                results.append(e.code().name)
        with pytest.raises(grpc.RpcError) as ended:
            list(too_long)
    finally:
        sleep.unlink()
    assert results == ["ok"] * STREAMS
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    if http is not None:
        assert http.result(timeout=60) == PARAMS.max_tokens
    wait_until(lambda: child.proc.pid != pid and serving(child), f"{child.instance_id} is restarted", timeout=60)
    if child.role != "router":
        stack.wait_registered([child], timeout=30)
    wait_until(lambda: answers(stack), "the router serves again", timeout=60)
    with Load(stack, reference) as load:
        load.wait_for(16, timeout=60)
    assert load.lost == []
    report(f"SIGTERM {child.instance_id}", load, time.monotonic() - stopped_at)
    pools_full(stack)


def _http_completion(stack: LocalStack) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.http_port}/v1/models", timeout=10) as reply:
        model = json.loads(reply.read())["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": PROMPTS[1], "max_tokens": PARAMS.max_tokens, "ignore_eos": True,
                       "temperature": 0}).encode()
    call = urllib.request.Request(f"http://127.0.0.1:{stack.http_port}/v1/completions", data=body,
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(call, timeout=60) as reply:
        return json.loads(reply.read())["usage"]["completion_tokens"]


def test_sigterm_to_a_decode_worker_completes_what_fits_in_the_grace(stack, fault_dir, reference):
    _drain_case(stack, stack.decodes[0], fault_dir, reference)


def test_sigterm_to_the_router_completes_what_fits_in_the_grace(stack, fault_dir, reference):
    _drain_case(stack, stack.router, fault_dir, reference)


# ---- router SIGKILL ------------------------------------------------------------------------------


def test_router_killed_under_load_workers_free_every_block(stack, reference):
    with Load(stack, reference, params=SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)) as load:
        time.sleep(0.5)
        stack.router.proc.kill()
        killed_at = time.monotonic()
    freed = wait_until(lambda: _idle(stack), "workers hold no request")  # the load stopped with the router
    print(f"\n[fault] router SIGKILL: workers idle {freed:.2f}s later; {len(load.lost)} streams broke")
    pools_full(stack)
    wait_until(lambda: serving(stack.router) and answers(stack), "the router is restarted", timeout=60)
    print(f"[fault] router back {time.monotonic() - killed_at:.2f}s after the kill")


def _idle(stack: LocalStack) -> bool:
    for c in [*stack.prefills, *stack.decodes]:
        stub = worker_pb2_grpc.DecodeWorkerStub if c.role == "decode" else worker_pb2_grpc.PrefillWorkerStub
        load = stub(c.channel()).GetLoad(worker_pb2.LoadRequest(), timeout=5)
        if load.requests or load.free_kv_blocks != load.total_kv_blocks:
            return False
    return True
