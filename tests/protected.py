"""A protected stack for the protection tests (test_bad_input.py, test_overload.py): API key,
TLS on the router's ports (a CA made at test time), internal mTLS between every process (as
`pdserve serve` always has), small caps and a small admission limit, tiny dummy model.

    router (key, TLS, caps) --mTLS--> decode-0, decode-1 (2 running + 2 queued each) --mTLS--> prefill-0
"""

from __future__ import annotations

import http.client
import json
import secrets
import ssl
from pathlib import Path

import grpc
import pytest

from pdserve.v1 import router_pb2, router_pb2_grpc
from services.cli.client import RemoteResult
from services.cli.stack import LocalStack
from services.rpc.security import make_server_cert
from tests.test_services import wait_all_free

MAX_MODEL_LEN = 512
MAX_SEQS = 2  # running per decode worker
MAX_QUEUED = 2  # queued per decode worker: admission limit of the stack = 2 x (2 + 2)
MODEL = ["--load-format", "dummy", "--preset", "tiny-llama", "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "64MiB",
         "--max-num-seqs", str(MAX_SEQS), "--grace", "1"]
KEY = f"sk-test-{secrets.token_hex(16)}"
MAX_BODY = 256 << 10
MAX_PROMPT_CHARS = 20_000
MAX_SEQS_PER_REQUEST = 8
SHORT = list(range(100, 120))  # decode prefills it locally
MODEL_NAME = "dummy-tiny-llama"


@pytest.fixture(scope="session")
def router_cert(tmp_path_factory) -> Path:
    return make_server_cert(tmp_path_factory.mktemp("router-tls"), ["127.0.0.1", "localhost"])


@pytest.fixture(scope="session")
def protected(router_cert, tmp_path_factory):
    router_argv = ["--tls-cert", str(router_cert / "tls.crt"), "--tls-key", str(router_cert / "tls.key"),
                   "--max-request-bytes", str(MAX_BODY), "--max-prompt-chars", str(MAX_PROMPT_CHARS),
                   "--max-seqs-per-request", str(MAX_SEQS_PER_REQUEST), "--served-model-name", MODEL_NAME]
    s = LocalStack(MODEL, num_prefill=1, num_decode=2, log_dir=tmp_path_factory.mktemp("protected"),
                   router_argv=router_argv, worker_argv=["--max-queued-requests", str(MAX_QUEUED)], api_keys=[KEY])
    s.start(timeout=300)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def tls_context(router_cert) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(router_cert / "ca.crt"))


@pytest.fixture(scope="session")
def secure_router(protected, router_cert):
    """The router's gRPC stub over TLS; calls still need the key (`with_key`)."""
    creds = grpc.ssl_channel_credentials(root_certificates=(router_cert / "ca.crt").read_bytes())
    channel = grpc.secure_channel(protected.router_address, creds)
    yield channel
    channel.close()


WITH_KEY = (("authorization", f"Bearer {KEY}"),)


def http_call(stack: LocalStack, ctx: ssl.SSLContext, method: str, path: str, body: bytes | dict | None = None,
              headers: dict[str, str] | list[tuple[str, str]] | None = None, key: str | None = KEY,
              skip_host: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTPS request (paths sent exactly as given); (status, headers, body)."""
    conn = http.client.HTTPSConnection("127.0.0.1", stack.http_port, context=ctx, timeout=60)
    try:
        conn.putrequest(method, path, skip_host=skip_host, skip_accept_encoding=True)
        items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        if key is not None:
            items.append(("Authorization", f"Bearer {key}"))
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        if data is not None:
            items.append(("Content-Type", "application/json"))
            if not any(k.lower() == "content-length" for k, _ in items):
                items.append(("Content-Length", str(len(data))))
        for k, v in items:
            conn.putheader(k, v)
        conn.endheaders()
        if data:
            conn.send(data)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def completion(prompt=SHORT, **fields) -> dict:
    return {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 4, "temperature": 0, **fields}


def generate_request(prompt=SHORT, max_tokens: int = 4, **sampling) -> router_pb2.GenerateRequest:
    msg = router_pb2.GenerateRequest()
    msg.token_ids.ids.extend(prompt)
    msg.sampling.max_tokens = max_tokens
    msg.sampling.temperature = 0
    for name, value in sampling.items():
        setattr(msg.sampling, name, value)
    return msg


def stream(channel: grpc.Channel, request: router_pb2.GenerateRequest, metadata=WITH_KEY) -> RemoteResult:
    result = RemoteResult("")
    for response in router_pb2_grpc.RouterStub(channel).Generate(request, metadata=metadata, timeout=60):
        result.add(response)
    return result


def wait_pools_full(stack: LocalStack, timeout: float = 30.0) -> None:
    wait_all_free(stack, timeout)


def assert_still_serving(stack: LocalStack, channel: grpc.Channel) -> None:
    """After a bad request: a normal one succeeds and every KV pool is full again."""
    result = stream(channel, generate_request())
    assert len(result.completions[0].token_ids) == 4
    wait_pools_full(stack)
