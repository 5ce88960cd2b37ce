"""End to end: router + prefill + decode as real processes on loopback (tiny dummy model).

One stack is shared by the session. Tests that must break something (kill a worker, a
mismatched or perturbing peer) start their own extra processes beside it.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.cli.client import RemoteResult
from services.cli.stack import Child, LocalStack, free_port
from services.engine import SamplingParams
from services.rpc.convert import params_to_proto
from tests.conftest import make_llm

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

MODEL = ["--load-format", "dummy", "--preset", "tiny-llama", "--max-model-len", "512",
         "--kv-cache-memory", "64MiB"]  # the CPU default, 1 GiB a worker, is resident memory the suite need not hold
SHORT = list(range(100, 120))  # 20 tokens: decode prefills locally (threshold 64)
LONG = list(range(2000, 2150))  # 150 tokens: prefilled remotely, 10 blocks shipped
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    # A deep prefill backlog: every long prompt of the 32-stream test is prefilled remotely.
    s = LocalStack(MODEL, num_prefill=1, num_decode=1, log_dir=tmp_path_factory.mktemp("stack"),
                   router_argv=["--prefill-backlog", "64"])
    s.start(timeout=300)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def reference():
    """The in-process engine on the same dummy weights."""
    return make_llm("tiny-llama")


@pytest.fixture(scope="session")
def router(stack):
    channel = grpc.insecure_channel(stack.router_address)
    yield router_pb2_grpc.RouterStub(channel)
    channel.close()


def worker_stub(child: Child, role: str):
    """A stub that calls the worker as its peers do (with its internal certificate, if it has one)."""
    channel = child.channel()
    stub_type = worker_pb2_grpc.PrefillWorkerStub if role == "prefill" else worker_pb2_grpc.DecodeWorkerStub
    return stub_type(channel)


def request(prompt, params: SamplingParams = GREEDY, sampling: common_pb2.SamplingParams | None = None,
            **kw) -> router_pb2.GenerateRequest:
    """`sampling` sends raw (possibly invalid) wire params instead of `params`."""
    msg = router_pb2.GenerateRequest(sampling=sampling or params_to_proto(params), **kw)
    if isinstance(prompt, str):
        msg.text = prompt
    else:
        msg.token_ids.ids.extend(prompt)
    return msg


def generate(router, prompt, params: SamplingParams = GREEDY, timeout=60, **kw) -> RemoteResult:
    result = RemoteResult(str(prompt))
    for response in router.Generate(request(prompt, params, **kw), timeout=timeout):
        result.add(response)
    return result


def worker_load(child: Child) -> worker_pb2.LoadResponse:
    return worker_stub(child, child.role).GetLoad(worker_pb2.LoadRequest(), timeout=5)


def wait_workers_free(workers: list[Child], timeout: float = 10.0) -> None:
    """Each of `workers` holds no request and no KV block (cached-but-free blocks count as free)."""
    deadline = time.monotonic() + timeout
    while True:
        loads = [worker_load(c) for c in workers]
        if all(load.requests == 0 and load.free_kv_blocks == load.total_kv_blocks for load in loads):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"blocks or requests still held: {loads}")
        time.sleep(0.05)


def wait_all_free(stack: LocalStack, timeout: float = 10.0) -> None:
    """Every worker of the stack holds no request and no KV block."""
    wait_workers_free([*stack.prefills, *stack.decodes], timeout)


def expected_tokens(reference, prompt, params=GREEDY) -> list[list[int]]:
    return [c.token_ids for c in reference.generate(prompt, params)[0].outputs]


# ---- correctness ---------------------------------------------------------------------------


def test_local_prefill_gives_the_in_process_tokens(stack, router, reference):
    result = generate(router, SHORT)
    assert result.completions[0].token_ids == expected_tokens(reference, SHORT)[0]
    d = result.disaggregation
    assert (d.remote_prefill, d.prefill_instance, d.decode_instance) == (False, "", "decode-0")
    assert d.decode_computed_prompt_tokens == 20 and d.kv_blocks_shipped == 0
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (20, 12)
    wait_all_free(stack)


def test_remote_prefill_gives_the_in_process_tokens_and_decode_computes_no_prompt_token(stack, router, reference):
    result = generate(router, LONG)
    assert result.completions[0].token_ids == expected_tokens(reference, LONG)[0]
    d = result.disaggregation
    assert (d.remote_prefill, d.prefill_instance, d.decode_instance) == (True, "prefill-0", "decode-0")
    assert d.decode_computed_prompt_tokens == 0
    # 150 tokens = 9 full blocks of 16 + a partial block of 6; tiny-llama: 2 layers x 2 x 2 heads x 16 dims x 4 B
    assert d.kv_blocks_shipped == 10 and d.kv_bytes_shipped == 150 * 2 * 2 * 2 * 16 * 4
    assert d.kv_transfer_ms > 0
    assert result.usage.prompt_tokens == 150
    wait_all_free(stack)


def test_text_prompt_is_tokenized_once_by_the_router(stack, router, reference):
    text = "What is AI? " * 20
    ids = router.Tokenize(router_pb2.TokenizeRequest(text=text)).token_ids
    assert list(ids) == reference.tokenizer.encode(text) and len(ids) > 64
    result = generate(router, text)
    assert result.completions[0].token_ids == expected_tokens(reference, list(ids))[0]
    assert result.completions[0].text == reference.generate(text, GREEDY)[0].outputs[0].text
    assert result.disaggregation.remote_prefill


def test_seeded_sampling_with_n_equals_the_in_process_engine(stack, router, reference):
    params = SamplingParams(n=3, temperature=0.8, top_p=0.9, seed=5, max_tokens=10, ignore_eos=True, logprobs=2)
    for prompt in (SHORT, LONG):
        result = generate(router, prompt, params)
        expected = reference.generate(prompt, params)[0].outputs
        assert [result.completions[i].token_ids for i in range(3)] == [c.token_ids for c in expected]
        got_first = {int(t): lp for t, lp in result.completions[1].logprobs[0].items()}
        assert got_first.keys() == expected[1].logprobs[0].keys()
        assert result.usage.completion_tokens == 30
    wait_all_free(stack)


def test_stop_strings_and_max_tokens_behave_as_in_process(stack, router, reference):
    text = completion = reference.generate(LONG, GREEDY)[0].outputs[0].text
    stop = text[6:10]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
    result = generate(router, LONG, params)
    expected = reference.generate(LONG, params)[0].outputs[0]
    assert result.completions[0].text == expected.text == completion[: completion.index(stop)]
    assert (result.completions[0].finish_reason, result.completions[0].stop_reason) == ("stop", stop)


def test_thirty_two_concurrent_streams_all_complete_correctly(stack, router, reference):
    prompts = [list(range(300 + 7 * i, 300 + 7 * i + (10 + 9 * i))) for i in range(32)]  # 10..289 tokens
    expected = [c[0] for c in (expected_tokens(reference, p) for p in prompts)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda p: generate(router, p, timeout=120), prompts))
    assert [r.completions[0].token_ids for r in results] == expected
    assert sum(r.disaggregation.remote_prefill for r in results) == sum(len(p) > 64 for p in prompts)
    wait_all_free(stack)


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, code, message",
    [
        (lambda: request(SHORT, SamplingParams(), sampling=common_pb2.SamplingParams(temperature=-1)),
         grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (lambda: request([]), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (lambda: request(""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (lambda: router_pb2.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (lambda: request(list(range(600))), grpc.StatusCode.INVALID_ARGUMENT, "context is 512"),
        (lambda: request([10**6]), grpc.StatusCode.INVALID_ARGUMENT, "token ids"),
        (lambda: request(SHORT, SamplingParams(), sampling=common_pb2.SamplingParams(top_p=1.5)),
         grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (lambda: request(SHORT, model="gpt-17"), grpc.StatusCode.NOT_FOUND, "gpt-17"),
    ],
)
def test_bad_requests_fail_with_a_clear_status_before_any_work(stack, router, make, code, message):
    with pytest.raises(grpc.RpcError) as err:
        list(router.Generate(make(), timeout=10))
    assert err.value.code() == code and message in err.value.details()
    wait_all_free(stack)


def test_unknown_fields_are_rejected(stack):
    raw = request(SHORT).SerializeToString() + bytes([0xF8, 0x06, 0x01])  # field 111, varint 1
    channel = grpc.insecure_channel(stack.router_address)
    call = channel.unary_stream("/pdserve.v1.Router/Generate", request_serializer=lambda b: b,
                                response_deserializer=common_pb2.GenerateResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        list(call(raw, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not know" in err.value.details()


def test_list_models_names_the_served_model(router):
    models = router.ListModels(router_pb2.ListModelsRequest()).models
    assert [(m.id, m.max_model_len) for m in models] == [("tiny-llama", 512)]


# ---- cancellation, health, metrics -------------------------------------------------------------


def finish_counts(child: Child) -> dict[str, float]:
    """The worker's pdserve:request_success_total by finish reason."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{child.metrics_port}/metrics", timeout=5).read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'pdserve:request_success_total\{[^}]*\bfinished_reason="(\w+)"[^}]*\} (\S+)', text)}


def test_client_cancel_frees_blocks_on_both_workers(stack, router):
    # 350 tokens would take the decode worker hundreds of steps: the cancel must end it, not its length.
    params = SamplingParams(temperature=0, max_tokens=350, ignore_eos=True)
    before = finish_counts(stack.decodes[0])
    call = router.Generate(request(LONG, params), timeout=60)
    received = 0
    for response in call:
        received += sum(len(c.token_ids) for c in response.outputs)
        if received >= 3:
            call.cancel()
            break
    wait_all_free(stack)
    after = finish_counts(stack.decodes[0])
    assert after.get("abort", 0) == before.get("abort", 0) + 1
    assert after.get("length", 0) == before.get("length", 0)  # it did not run to its end


def test_every_service_reports_serving_health(stack):
    for c in stack.children:
        with c.health_channel() as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, c.instance_id


def test_metrics_endpoints_expose_vllm_style_names(stack, router):
    generate(router, LONG)
    decode_metrics = urllib.request.urlopen(f"http://127.0.0.1:{stack.decodes[0].metrics_port}/metrics").read().decode()
    prefill_metrics = urllib.request.urlopen(f"http://127.0.0.1:{stack.prefills[0].metrics_port}/metrics").read().decode()
    router_metrics = urllib.request.urlopen(f"http://127.0.0.1:{stack.http_port}/metrics").read().decode()
    for name in ("pdserve:time_to_first_token_seconds_bucket", "pdserve:inter_token_latency_seconds_bucket",
                 "pdserve:e2e_request_latency_seconds_count", "pdserve:num_requests_running",
                 "pdserve:kv_cache_usage_perc", "pdserve:kv_transfer_seconds_count", "pdserve:num_preemptions_total"):
        assert name in decode_metrics, name
    received = re.search(r'pdserve:kv_blocks_shipped_total\{[^}]*\bdirection="received"[^}]*\} (\d+)', decode_metrics)
    sent = re.search(r'pdserve:kv_blocks_shipped_total\{[^}]*\bdirection="sent"[^}]*\} (\d+)', prefill_metrics)
    assert received and sent and int(float(received.group(1))) >= 10 and int(float(sent.group(1))) >= 10
    assert "pdserve:time_to_first_token_seconds_count" in router_metrics
    health = urllib.request.urlopen(f"http://127.0.0.1:{stack.http_port}/healthz").read()
    assert b'"status":"ok"' in health


def test_handshake_with_a_mismatched_identity_is_failed_precondition(stack):
    prefill = worker_stub(stack.prefills[0], "prefill")
    good = prefill.Handshake(worker_pb2.HandshakeRequest(instance_id="t", role="decode"), timeout=5)
    assert good.identity.block_size == 16 and good.identity.model == "dummy:tiny-llama:seed=0"
    bad = worker_pb2.ModelIdentity()
    bad.CopyFrom(good.identity)
    bad.block_size, bad.model = 32, "dummy:tiny-llama:seed=1"
    with pytest.raises(grpc.RpcError) as err:
        prefill.Handshake(worker_pb2.HandshakeRequest(instance_id="t", role="decode", identity=bad), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "block_size: ours 16, theirs 32" in err.value.details() and "seed=1" in err.value.details()


# ---- faults: extra processes beside the shared stack --------------------------------------------


def kv_faults(name: str) -> dict[str, str]:
    """The environment that turns on one of tests/kv_faults' faults in a spawned worker."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # The checkout's generated stubs too (protos/), not an installed copy's: they must match its code.
    # Then whatever PYTHONPATH already holds (on the GPU host: the carried wheels' folder).
    paths = [os.path.join(root, "tests", "kv_faults"), os.path.join(root, "protos"), root]
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in paths]
    return {"PYTHONPATH": os.pathsep.join(paths + inherited), name: "1"}


def spawn(tmp_path, role: str, extra: list[str], env: dict | None = None, model=MODEL) -> Child:
    port = free_port()
    child = Child(role, f"{role}-x{port}", f"127.0.0.1:{port}", 0,
                  [os.sys.executable, "-m", "services.cli.main", role, "--port", str(port), "--metrics-port", "0",
                   "--instance-id", f"{role}-x{port}", *extra, *model], tmp_path / f"{role}-{port}.log")
    child.start({**os.environ, **(env or {})})
    return child


def wait_serving(child: Child, timeout: float = 120) -> None:
    child.wait_serving(timeout)


def decode_directly(child: Child, prompt, prefill_instance: str, params=GREEDY, timeout=60) -> RemoteResult:
    stub = worker_stub(child, "decode")
    result = RemoteResult(str(prompt))
    msg = worker_pb2.DecodeRequest(request_id=f"t{time.monotonic_ns()}", prompt_token_ids=prompt,
                                   sampling=params_to_proto(params), prefill_instance=prefill_instance)
    for response in stub.Generate(msg, timeout=timeout):
        result.add(response)
    return result


def stop(child: Child) -> None:
    if child.alive():
        child.proc.terminate()
        child.proc.wait(20)


def as_stack_peer(stack: LocalStack) -> list[str]:
    """Flags that make a spawned decode worker a peer of the stack's prefill worker (its
    internal certificate: the stack's workers answer nobody else)."""
    return ["--internal-tls", str(stack.certs["decode-0"])]


def test_decode_really_uses_the_shipped_kv(stack, tmp_path, reference):
    peers = f"prefill-0={stack.prefills[0].address}"
    perturbing = spawn(tmp_path, "decode", ["--prefill-peers", peers, *as_stack_peer(stack)],
                       env=kv_faults("PDSERVE_TEST_PERTURB_KV"))
    try:
        wait_serving(perturbing)
        other = list(range(3000, 3150))  # not in this worker's prefix cache
        local = decode_directly(perturbing, LONG, "")
        remote = decode_directly(perturbing, other, "prefill-0")
    finally:
        stop(perturbing)
    assert remote.disaggregation.remote_prefill and remote.disaggregation.decode_computed_prompt_tokens == 0
    assert local.completions[0].token_ids == expected_tokens(reference, LONG)[0]
    assert remote.completions[0].token_ids != expected_tokens(reference, other)[0]


def test_decode_with_a_mismatched_model_gets_failed_precondition(stack, tmp_path):
    peers = f"prefill-0={stack.prefills[0].address}"
    other = spawn(tmp_path, "decode", ["--prefill-peers", peers, "--dummy-seed", "7", *as_stack_peer(stack)])
    try:
        wait_serving(other)
        with pytest.raises(grpc.RpcError) as err:
            decode_directly(other, LONG, "prefill-0")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "seed=7" in err.value.details()
        assert worker_stub(other, "decode").GetLoad(worker_pb2.LoadRequest()).requests == 0
    finally:
        stop(other)


def test_prefill_killed_mid_transfer_the_request_completes_with_the_same_tokens(tmp_path):
    # A model big enough that a long prompt in 16-token chunks takes many steps to prefill.
    model = ["--load-format", "dummy", "--preset", "smollm2-135m", "--max-model-len", "1024",
             "--max-num-batched-tokens", "16", "--kv-cache-memory", "256MiB"]
    prefill = spawn(tmp_path, "prefill", [], model=model)
    decode = spawn(tmp_path, "decode", ["--prefill-peers", f"p={prefill.address}"], model=model[:-2])
    prompt = list(range(5000, 5900))  # 57 blocks
    try:
        wait_serving(prefill)
        wait_serving(decode)
        expected = decode_directly(decode, prompt, "").completions[0].token_ids  # local prefill

        def kill_after_first_block():
            stub = worker_stub(prefill, "prefill")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                load = stub.GetLoad(worker_pb2.LoadRequest(), timeout=5)
                if load.requests:
                    time.sleep(0.2)  # a few chunks in: blocks are on their way
                    prefill.proc.kill()
                    return
                time.sleep(0.01)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            killer = pool.submit(kill_after_first_block)
            result = decode_directly(decode, prompt, "p", timeout=120)
            killer.result()
    finally:
        stop(decode)
        stop(prefill)
    d = result.disaggregation
    assert d.remote_prefill and 0 < d.decode_computed_prompt_tokens < 900
    assert result.completions[0].token_ids == expected


def test_health_answers_promptly_during_a_long_prefill(tmp_path):
    model = ["--load-format", "dummy", "--preset", "smollm2-135m", "--max-model-len", "2048", "--kv-cache-memory", "256MiB"]
    worker = spawn(tmp_path, "decode", [], model=model)
    try:
        wait_serving(worker)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            busy = pool.submit(decode_directly, worker, list(range(3000, 4600)), "",
                               SamplingParams(temperature=0, max_tokens=1))
            latencies = []
            with worker.health_channel() as ch:
                health = health_pb2_grpc.HealthStub(ch)
                time.sleep(0.3)  # the prefill step is running now
                while not busy.done():
                    t0 = time.monotonic()
                    health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    latencies.append(time.monotonic() - t0)
                    time.sleep(0.05)
            busy.result()
            prefill_seconds = time.monotonic() - started
    finally:
        stop(worker)
    assert prefill_seconds > 2.0, "the prefill was too short to prove anything"
    # A health check stuck behind the prefill would wait for most of it (> 1 s). The 2-core CI
    # machine is saturated by the prefill's threads, so a rare answer takes ~100 ms: the bound
    # on all of them is the blocking one, the 100 ms bound holds for nine in ten.
    latencies.sort()
    assert len(latencies) >= 10 and latencies[-1] < 1.0 and latencies[len(latencies) * 9 // 10] < 0.1, latencies


def test_router_answers_unavailable_before_the_deadline_when_its_decode_is_gone(tmp_path):
    """The router says UNAVAILABLE itself, well inside the client's deadline: a router that
    waited on the dead worker would end the call with DEADLINE_EXCEEDED instead (an outcome,
    not a timing)."""
    decode = spawn(tmp_path, "decode", [])
    port, http = free_port(), free_port()
    router = Child("router", "r", f"127.0.0.1:{port}", http,
                   [os.sys.executable, "-m", "services.cli.main", "router", "--port", str(port), "--http-port", str(http),
                    "--decode-peers", f"d={decode.address}", *MODEL], tmp_path / "router.log")
    try:
        wait_serving(decode)
        router.start(None)
        wait_serving(router)
        stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(router.address))
        assert generate(stub, SHORT).completions[0].finish_reason == "length"
        decode.proc.kill()
        decode.proc.wait()
        with pytest.raises(grpc.RpcError) as err:
            generate(stub, SHORT, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop(router)
        stop(decode)


def test_colocated_stack_without_prefill_workers_prefills_on_decode(tmp_path, reference):
    with LocalStack(MODEL, num_prefill=0, num_decode=1, log_dir=tmp_path) as colocated:
        stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(colocated.router_address))
        result = generate(stub, LONG)
        assert result.completions[0].token_ids == expected_tokens(reference, LONG)[0]
        d = result.disaggregation
        assert not d.remote_prefill and d.decode_computed_prompt_tokens == 150
        wait_all_free(colocated)


def test_corrupted_blocks_are_detected_and_the_request_recomputes_locally(tmp_path, reference):
    corrupting = spawn(tmp_path, "prefill", [], env=kv_faults("PDSERVE_TEST_CORRUPT_KV"))
    decode = spawn(tmp_path, "decode", ["--prefill-peers", f"bad={corrupting.address}"])
    try:
        wait_serving(corrupting)
        wait_serving(decode)
        result = decode_directly(decode, LONG, "bad")
    finally:
        stop(decode)
        stop(corrupting)
    d = result.disaggregation
    assert d.remote_prefill and d.decode_computed_prompt_tokens == 150  # the first block was already bad
    assert result.completions[0].token_ids == expected_tokens(reference, LONG)[0]
