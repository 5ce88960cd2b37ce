"""Bad input at every entry point of a protected stack (tests/protected.py): the HTTP port, the
router's gRPC port and the workers' gRPC ports. Each case asserts the exact status and that
the message names no Python internals; then a normal request still succeeds and every
worker's KV pool is full again.
"""

from __future__ import annotations

import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.rpc.security import make_internal_certs
from tests.protected import (KEY, MAX_BODY, MAX_MODEL_LEN, MAX_PROMPT_CHARS, MAX_SEQS_PER_REQUEST, MODEL_NAME, SHORT,
                             WITH_KEY, assert_still_serving, completion, generate_request, http_call, protected,
                             router_cert, secure_router, stream, tls_context)

pytestmark = pytest.mark.slow
__all__ = ["protected", "router_cert", "secure_router", "tls_context"]  # session fixtures shared with test_overload

LEAKS = ("<class", "Traceback", "Error:", "File \"", ".py", "0x")


@pytest.fixture(autouse=True)
def still_serving(protected, secure_router):
    yield
    assert_still_serving(protected, secure_router)


def no_leak(text: str) -> None:
    assert not any(marker in text for marker in LEAKS), text


# ---- HTTP --------------------------------------------------------------------------------------

DEEP = 100_000
DEEP_SCHEMA = '{"type":"object","properties":{"a":' * 500 + '{"type":"string"}' + "}}" * 500  # 500 levels


@pytest.mark.parametrize("body,status", [
    # numbers
    (completion(temperature=-1), 400), (completion(max_tokens=0), 400), (completion(max_tokens=-1), 400),
    (completion(max_tokens=2**32 - 1), 400), (completion(max_tokens=2**63), 400), (completion(n=0), 400),
    (completion(n=2**63), 400), (completion(seed=2**63), 400), (completion(seed=-1), 400),
    (completion(priority=2**40), 400), (completion(priority=1), 400), (completion(logprobs=2**32 - 1), 400),
    (completion(top_k=2**63), 400), (completion(top_p=0), 400), (completion(repetition_penalty=0), 400),
    (b'{"model": "dummy-tiny-llama", "prompt": [1], "temperature": Infinity}', 400),
    (b'{"model": "dummy-tiny-llama", "prompt": [1], "temperature": NaN}', 400),
    (b'{"model": "dummy-tiny-llama", "prompt": [1], "temperature": 1e999}', 400),
    (b'{"model": "dummy-tiny-llama", "prompt": [1], "repetition_penalty": 1e999}', 400),
    (completion(temperature="Infinity"), 400), (completion(frequency_penalty="NaN"), 400),
    (completion(logit_bias={"5": 1e999}), 400),
    # sizes
    (completion(prompt=[SHORT] * MAX_SEQS_PER_REQUEST, n=2), 400),
    (completion(n=MAX_SEQS_PER_REQUEST + 1), 400),
    (completion(prompt="x" * (MAX_PROMPT_CHARS + 1)), 400),
    (completion(prompt=list(range(MAX_MODEL_LEN))), 400),
    (completion(prompt=list(range(100, 100 + MAX_MODEL_LEN - 8)), max_tokens=16), 400),
    (completion(prompt=[49152]), 400),
    # encodings
    (b'{"model": ', 400), (b"\xff\xfe{}", 400), (b"[1, 2]", 400), (b'"a string"', 400),
    (b"[" * DEEP + b"]" * DEEP, 400), (b'{"a":' * (DEEP // 3) + b"1" + b"}" * (DEEP // 3), 400),
    (b'{"model": "dummy-tiny-llama", "prompt": [1, 2, 3], "guided_json": ' + DEEP_SCHEMA.encode() + b"}", 400),
], ids=lambda v: str(v)[:60] if not isinstance(v, int) else None)
def test_http_bad_body_gets_its_status(protected, tls_context, body, status):
    got, _, text = http_call(protected, tls_context, "POST", "/v1/completions", body)
    assert got == status, text[:300]
    error = json.loads(text)["error"]
    no_leak(error["message"])


def test_http_body_over_the_cap_is_413_without_being_read(protected, tls_context):
    got, _, _ = http_call(protected, tls_context, "POST", "/v1/completions", b"{" + b" " * MAX_BODY + b"}")
    assert got == 413
    # A body that claims 200 MB is refused from its header: only a few bytes are ever sent.
    got, _, _ = http_call(protected, tls_context, "POST", "/v1/completions", b"{}",
                          headers={"Content-Length": str(200 << 20)})
    assert got == 413


def test_http_too_many_or_too_large_headers_are_431(protected, tls_context):
    many = [(f"x-h{i}", "1") for i in range(101)]
    assert http_call(protected, tls_context, "GET", "/v1/models", headers=many)[0] == 431
    assert http_call(protected, tls_context, "GET", "/v1/models", headers={"x-big": "a" * (17 << 10)})[0] == 431


@pytest.mark.parametrize("auth", [None, "", "Bearer", "Bearer ", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}",
                                  f"Basic {KEY}", KEY, f"Bearer {KEY.upper()}", "Bearer sk-wrong"])
def test_http_missing_wrong_or_near_miss_keys_are_401(protected, tls_context, auth):
    headers = {"Authorization": auth} if auth is not None else None
    for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/completions", completion()),
                               ("GET", "/metrics", None)):
        got, headers_back, _ = http_call(protected, tls_context, method, path, body, headers=headers, key=None)
        assert got == 401 and headers_back.get("www-authenticate", "").startswith("Bearer"), (path, got)


@pytest.mark.parametrize("path", ["//v1/models", "/v1/models/", "/V1/models", "/v1//models", "/v1/%6Dodels",
                                  "/healthz/../v1/models", "/healthz/", "/HEALTHZ", "/healthz%2F..%2Fv1%2Fmodels",
                                  "/v1/models?x=/healthz", "/./v1/models", "/metrics/", "/%2e/v1/models",
                                  "/v1/completions#/healthz"])
def test_http_path_tricks_never_reach_a_handler_without_the_key(protected, tls_context, path):
    method, body = ("POST", completion()) if "completions" in path else ("GET", None)
    assert http_call(protected, tls_context, method, path, body, key=None)[0] == 401


def test_http_odd_host_headers_change_nothing(protected, tls_context):
    for host in ("evil.example", "127.0.0.1:1", "", "localhost/healthz"):
        got, _, _ = http_call(protected, tls_context, "GET", "/v1/models", headers={"Host": host}, key=None,
                              skip_host=True)
        assert got in (400, 401), host  # h11 refuses some Host values outright; none gets through
    assert http_call(protected, tls_context, "GET", "/v1/models", headers={"Host": "evil.example"},
                     skip_host=True)[0] == 200


def test_http_health_paths_alone_are_open(protected, tls_context):
    for path in ("/healthz", "/health", "/ping"):
        assert http_call(protected, tls_context, "GET", path, key=None)[0] == 200
    assert http_call(protected, tls_context, "GET", "/v1/models")[0] == 200
    assert http_call(protected, tls_context, "GET", "/metrics")[0] == 200


def test_http_priority_and_request_ids_cannot_steer_or_collide(protected, tls_context, secure_router):
    assert http_call(protected, tls_context, "POST", "/v1/completions", completion(priority=-5))[0] == 400
    # Two gRPC clients choosing the same request id both complete, each with its own tokens,
    # and each reply carries the id its client chose.
    a = router_pb2.GenerateRequest(request_id="mine", **_fields(generate_request(SHORT, 6)))
    b = router_pb2.GenerateRequest(request_id="mine", **_fields(generate_request(list(range(300, 320)), 6)))
    first, second = stream(secure_router, a), stream(secure_router, b)
    assert first.request_id == second.request_id == "mine"
    assert len(first.completions[0].token_ids) == len(second.completions[0].token_ids) == 6


def _fields(msg: router_pb2.GenerateRequest) -> dict:
    return {"token_ids": msg.token_ids, "sampling": msg.sampling}


# ---- router gRPC -------------------------------------------------------------------------------


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details() or ""


def _generate(channel, request, metadata=WITH_KEY):
    return lambda: list(router_pb2_grpc.RouterStub(channel).Generate(request, metadata=metadata, timeout=30))


@pytest.mark.parametrize("sampling,code", [
    (dict(temperature=float("inf")), "INVALID_ARGUMENT"), (dict(temperature=float("nan")), "INVALID_ARGUMENT"),
    (dict(repetition_penalty=float("inf")), "INVALID_ARGUMENT"), (dict(top_p=float("nan")), "INVALID_ARGUMENT"),
    (dict(max_tokens=2**32 - 1), "INVALID_ARGUMENT"), (dict(max_tokens=0), "INVALID_ARGUMENT"),
    (dict(n=MAX_SEQS_PER_REQUEST + 1), "INVALID_ARGUMENT"), (dict(seed=2**63 - 1), "OK"),
    (dict(json_schema=DEEP_SCHEMA), "INVALID_ARGUMENT"),
], ids=lambda v: str(v)[:40])
def test_grpc_bad_sampling_gets_its_status(secure_router, sampling, code):
    request = generate_request()
    schema = sampling.pop("json_schema", None)
    if schema is not None:
        request.sampling.structured_output.json_schema = schema
    for name, value in sampling.items():
        setattr(request.sampling, name, value)
    if code == "OK":
        _generate(secure_router, request)()
        return
    got, details = _code(_generate(secure_router, request))
    assert got.name == code, details
    no_leak(details)


def test_grpc_an_explicit_max_tokens_past_the_context_is_an_error_not_a_truncation(secure_router):
    prompt = list(range(100, 100 + MAX_MODEL_LEN - 1))
    got, details = _code(_generate(secure_router, generate_request(prompt, max_tokens=16)))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in details


@pytest.mark.parametrize("build", [
    lambda r: r.token_ids.ids.extend(range(MAX_MODEL_LEN)),
    lambda r: setattr(r, "text", "x" * (MAX_PROMPT_CHARS + 1)),
    lambda r: r.token_ids.ids.extend([49152]),
    lambda r: r.token_ids.ids.extend([]),
    lambda r: setattr(r, "priority", 3),
    lambda r: setattr(r, "model", "other-model"),
], ids=["ids-over-context", "chars-over-cap", "id-past-vocab", "empty", "priority-under-fcfs", "unknown-model"])
def test_grpc_bad_prompts_are_refused_before_any_work(secure_router, build):
    request = router_pb2.GenerateRequest()
    request.sampling.max_tokens = 4
    build(request)
    got, details = _code(_generate(secure_router, request))
    assert got in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), details
    no_leak(details)


def test_grpc_messages_and_metadata_over_the_caps_are_resource_exhausted(secure_router):
    huge = generate_request()
    huge.text = "x" * (MAX_BODY + 1)
    assert _code(_generate(secure_router, huge))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    tokenize = router_pb2_grpc.RouterStub(secure_router).Tokenize
    got = _code(lambda: tokenize(router_pb2.TokenizeRequest(text="y" * (MAX_BODY + 1)), metadata=WITH_KEY))[0]
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED
    big_metadata = (*WITH_KEY, ("x-big", "a" * (20 << 10)))
    assert _code(_generate(secure_router, generate_request(), big_metadata))[0] != grpc.StatusCode.OK


def test_grpc_malformed_protobuf_bytes_are_invalid_argument(secure_router):
    raw = secure_router.unary_stream("/pdserve.v1.Router/Generate")  # no serializer: bytes as given
    for data in (b"\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05abc"):
        got, details = _code(lambda: list(raw(data, metadata=WITH_KEY, timeout=10)))
        assert got == grpc.StatusCode.INVALID_ARGUMENT, details
        no_leak(details)


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer nope"),), (("authorization", KEY),),
                                      (("authorization", f"Bearer {KEY} x"),)])
def test_grpc_calls_without_a_valid_key_are_unauthenticated(secure_router, metadata):
    assert _code(_generate(secure_router, generate_request(), metadata))[0] == grpc.StatusCode.UNAUTHENTICATED
    stub = router_pb2_grpc.RouterStub(secure_router)
    for call in (lambda: stub.ListModels(router_pb2.ListModelsRequest(), metadata=metadata),
                 lambda: stub.Tokenize(router_pb2.TokenizeRequest(text="hi"), metadata=metadata)):
        assert _code(call)[0] == grpc.StatusCode.UNAUTHENTICATED
    reflection = secure_router.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert _code(lambda: list(reflection(iter([b"\x3a\x00"]), metadata=metadata, timeout=5)))[0] == \
        grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(secure_router).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # health alone is open


# ---- worker gRPC -------------------------------------------------------------------------------


def _worker_calls(channel: grpc.Channel, role: str):
    stub = worker_pb2_grpc.DecodeWorkerStub(channel) if role == "decode" else worker_pb2_grpc.PrefillWorkerStub(channel)
    calls = {"GetLoad": lambda: stub.GetLoad(worker_pb2.LoadRequest(), timeout=5),
             "Handshake": lambda: stub.Handshake(worker_pb2.HandshakeRequest(instance_id="x"), timeout=5),
             "Abort": lambda: stub.Abort(worker_pb2.AbortRequest(request_id="x"), timeout=5)}
    if role == "decode":
        calls["Generate"] = lambda: list(stub.Generate(worker_pb2.DecodeRequest(prompt_token_ids=SHORT), timeout=5))
        calls["GenerateStream"] = lambda: list(stub.GenerateStream(iter([worker_pb2.DecodeCall(cancel="x")]),
                                                                   timeout=5))
    else:
        calls["Prefill"] = lambda: list(stub.Prefill(worker_pb2.PrefillRequest(prompt_token_ids=SHORT), timeout=5))
        calls["ReleaseKV"] = lambda: stub.ReleaseKV(worker_pb2.ReleaseKVRequest(request_id="x"), timeout=5)
    return calls


def test_workers_refuse_callers_without_the_internal_credential(protected, router_cert, tmp_path):
    stranger = make_internal_certs(tmp_path, ["stranger"])["stranger"]  # right shape, another CA
    for child in (*protected.prefills, *protected.decodes):
        channels = [grpc.insecure_channel(child.address),
                    grpc.secure_channel(child.address, grpc.ssl_channel_credentials(
                        (protected.certs["router"] / "ca.crt").read_bytes()),
                        options=[("grpc.ssl_target_name_override", "pdserve-internal")]),
                    grpc.secure_channel(child.address, grpc.ssl_channel_credentials(
                        (stranger / "ca.crt").read_bytes(), (stranger / "tls.key").read_bytes(),
                        (stranger / "tls.crt").read_bytes()),
                        options=[("grpc.ssl_target_name_override", "pdserve-internal")])]
        for channel in channels:
            for name, call in _worker_calls(channel, child.role).items():
                got, _ = _code(call)
                assert got == grpc.StatusCode.UNAVAILABLE, (child.instance_id, name, got)
            channel.close()
        with child.health_channel() as channel:  # probes need no credential, on the health port
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_workers_revalidate_what_a_peer_sends(protected):
    decode = protected.decodes[0]
    with decode.channel() as channel:
        stub = worker_pb2_grpc.DecodeWorkerStub(channel)
        bad = [worker_pb2.DecodeRequest(prompt_token_ids=SHORT, priority=2),
               worker_pb2.DecodeRequest(prompt_token_ids=list(range(MAX_MODEL_LEN))),
               worker_pb2.DecodeRequest(prompt_token_ids=list(range(100, 100 + MAX_MODEL_LEN - 4)))]
        bad[2].sampling.max_tokens = 16
        inf = worker_pb2.DecodeRequest(prompt_token_ids=SHORT)
        inf.sampling.temperature = float("inf")
        for request in [*bad, inf]:
            got, details = _code(lambda: list(stub.Generate(request, timeout=10)))
            assert got == grpc.StatusCode.INVALID_ARGUMENT, details
            no_leak(details)
        raw = channel.unary_stream("/pdserve.v1.DecodeWorker/Generate")
        assert _code(lambda: list(raw(b"\xff\xff", timeout=5)))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_a_peer_cannot_abort_another_peers_request(protected, secure_router):
    """The router's requests live on decode-0 as router/ID; another peer (decode-1's
    certificate) naming the same id reaches nothing of the router's."""
    decode, other = protected.decodes[0], protected.decodes[1]
    with decode.channel() as as_self, grpc.secure_channel(decode.address, _credentials(protected, other.instance_id),
                                                           options=[("grpc.ssl_target_name_override",
                                                                     "pdserve-internal")]) as as_other:
        request = worker_pb2.DecodeRequest(request_id="victim", prompt_token_ids=SHORT)
        request.sampling.max_tokens, request.sampling.ignore_eos = 300, True
        call = worker_pb2_grpc.DecodeWorkerStub(as_self).Generate(request, timeout=60)
        next(call)  # it is running
        found = worker_pb2_grpc.DecodeWorkerStub(as_other).Abort(worker_pb2.AbortRequest(request_id="victim"))
        assert not found.found
        tokens = sum(len(c.token_ids) for r in call for c in r.outputs) + 1
        assert tokens >= 300 - 1  # ran to its end, untouched
        mine = worker_pb2_grpc.DecodeWorkerStub(as_self).Abort(worker_pb2.AbortRequest(request_id="victim"))
        assert not mine.found  # finished: nothing left to abort


def _credentials(stack, name: str) -> grpc.ChannelCredentials:
    d = stack.certs[name]
    return grpc.ssl_channel_credentials((d / "ca.crt").read_bytes(), (d / "tls.key").read_bytes(),
                                        (d / "tls.crt").read_bytes())


def test_models_are_listed_with_the_key(protected, tls_context):
    got, _, text = http_call(protected, tls_context, "GET", "/v1/models")
    assert got == 200 and json.loads(text)["data"][0]["id"] == MODEL_NAME
