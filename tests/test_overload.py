"""Admission control under a burst, a router that stays live while a maximal prompt tokenizes,
and TLS with the official client: against the protected stack (tests/protected.py) and, for
liveness, a router run in this process with its tokenizer held on an event.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest
import uvicorn

from pdserve.v1 import router_pb2_grpc
from router.http import build_app
from router.limits import Limits
from router.policy import RoutingConfig, make_policy
from router.registry import StaticRegistry
from router.server import RouterServicer
from services.cli.stack import Child, LocalStack, free_port
from services.engine import loader
from services.engine.tokenizer import Tokenizer
from services.rpc.security import TLSFiles
from tests.protected import (KEY, MAX_QUEUED, MAX_SEQS, MODEL_NAME, SHORT, WITH_KEY, generate_request, http_call,
                             protected, router_cert, secure_router, tls_context, wait_pools_full)

pytestmark = pytest.mark.slow
__all__ = ["protected", "router_cert", "secure_router", "tls_context"]


# ---- a burst past the admission limit ----------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class PeakRSS:
    """Samples every process's RSS every 10 ms while in use."""

    def __init__(self, children: list[Child]) -> None:
        self.pids = {c.instance_id: c.proc.pid for c in children}
        self.idle = {name: rss_mb(pid) for name, pid in self.pids.items()}
        self.peak = dict(self.idle)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_mb(pid))

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def counter(text: str, name: str, labels: str = "") -> float:
    """A series' value; `labels` ('{k="v"}') need not list model_name, which every series has."""
    selector = rf"\{{(?=[^}}]*{re.escape(labels[1:-1])})[^}}]*\}}" if labels else r"(?:\{[^}]*\})?"
    match = re.search(rf"^{re.escape(name)}{selector} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def scrape(url: str, headers: dict[str, str] | None = None, context=None) -> str:
    request = urllib.request.Request(url, headers=headers or {})
    return urllib.request.urlopen(request, timeout=10, context=context).read().decode()


def one_grpc(channel: grpc.Channel, prompt: list[int], max_tokens: int) -> dict:
    start, tokens, first_message_at = time.monotonic(), 0, None
    try:
        for response in router_pb2_grpc.RouterStub(channel).Generate(
                generate_request(prompt, max_tokens, ignore_eos=True), metadata=WITH_KEY, timeout=120):
            first_message_at = first_message_at or time.monotonic()
            tokens += sum(len(c.token_ids) for c in response.outputs)
        return {"ok": True, "tokens": tokens}
    except grpc.RpcError as e:
        return {"ok": False, "code": e.code().name, "tokens": tokens, "after_s": time.monotonic() - start,
                "messages_before": first_message_at is not None}


def one_http(stack: LocalStack, ctx, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    status, headers, text = http_call(stack, ctx, "POST", "/v1/completions", body)
    if status == 200:
        return {"ok": True, "tokens": json.loads(text)["usage"]["completion_tokens"]}
    return {"ok": False, "code": status, "retry_after": headers.get("retry-after"), "tokens": 0,
            "messages_before": False}


def test_a_burst_of_four_times_the_admission_limit_is_refused_cheaply(protected, secure_router, tls_context, capsys):
    limit = len(protected.decodes) * (MAX_SEQS + MAX_QUEUED)  # seated + queued across the decode workers
    burst, max_tokens = 4 * limit, 48
    metrics_url = [f"http://127.0.0.1:{d.metrics_port}/metrics" for d in protected.decodes]
    worker_before = sum(counter(scrape(u), "pdserve:admission_rejections_total", '{where="worker"}')
                        for u in metrics_url)
    with PeakRSS(protected.children) as rss, concurrent.futures.ThreadPoolExecutor(burst) as pool:
        prompts = [[1000 + i, *SHORT] for i in range(burst)]
        futures = [pool.submit(one_http, protected, tls_context, p, max_tokens) if i % 4 == 0
                   else pool.submit(one_grpc, secure_router, p, max_tokens) for i, p in enumerate(prompts)]
        results = [f.result() for f in futures]
    admitted = [r for r in results if r["ok"]]
    refused = [r for r in results if not r["ok"]]
    assert refused and admitted, results
    assert all(r["tokens"] == max_tokens for r in admitted)  # every admitted request completes
    for r in refused:  # refused as overloaded, before any token of it was computed or sent
        assert r["code"] in ("RESOURCE_EXHAUSTED", 429) and r["tokens"] == 0 and not r["messages_before"], r
        assert r["code"] == "RESOURCE_EXHAUSTED" or r["retry_after"] == "1"
    worker_after = sum(counter(scrape(u), "pdserve:admission_rejections_total", '{where="worker"}')
                       for u in metrics_url)
    # The router tried the other decode worker before refusing: two worker refusals per refused request.
    assert worker_after - worker_before >= 2 * len(refused)
    router_metrics = scrape(f"https://127.0.0.1:{protected.http_port}/metrics",
                            {"Authorization": f"Bearer {KEY}"}, tls_context)
    assert counter(router_metrics, "pdserve:admission_rejections_total", '{where="router"}') >= len(refused)
    for name in rss.pids:
        assert rss.peak[name] - rss.idle[name] < 200, (name, rss.idle[name], rss.peak[name])
    wait_pools_full(protected)
    latencies = sorted(r["after_s"] for r in refused if "after_s" in r)
    with capsys.disabled():
        print(f"\nburst {burst} (limit {limit}): {len(admitted)} admitted, {len(refused)} refused; refusals came "
              f"back in p50 {latencies[len(latencies) // 2] * 1e3:.0f} ms, max {latencies[-1] * 1e3:.0f} ms; "
              f"peak RSS growth {max(rss.peak[n] - rss.idle[n] for n in rss.pids):.0f} MB")


# ---- the router's event loop stays live ---------------------------------------------------------


class RouterInProcess:
    """A router (HTTP port) on its own event loop in a thread, over the protected stack's decode
    workers, with a tokenizer the test controls."""

    def __init__(self, stack: LocalStack, tokenizer: Tokenizer, limits: Limits) -> None:
        self.port = free_port()
        self.server: uvicorn.Server | None = None
        self.ready = threading.Event()
        self.stack, self.tokenizer, self.limits = stack, tokenizer, limits
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        decodes = {d.instance_id: d.address for d in self.stack.decodes}
        registry = StaticRegistry({}, decodes, tls=TLSFiles.internal(self.stack.certs["router"]))
        servicer = RouterServicer(registry, make_policy("least_loaded", RoutingConfig()), self.tokenizer,
                                  MODEL_NAME, 512, 49152, limits=self.limits)
        config = uvicorn.Config(build_app(registry, servicer), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.ready.set()
        try:
            await self.server.serve()
        finally:
            servicer.close()
            await registry.close()

    def __enter__(self) -> RouterInProcess:
        self.thread.start()
        self.ready.wait(30)
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def get(self, path: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def test_health_models_and_bad_requests_answer_while_a_maximal_prompt_tokenizes(protected):
    """The tokenizer is held on an event in the middle of a maximal prompt: if tokenizing ran
    on the event loop, nothing else could answer until the event is set."""
    tokenizer = Tokenizer.load(loader.resolve(None, weights=False).tokenizer_dir)
    maximal = "hello world " * 200  # 2,400 characters, the cap below; 400 tokens, inside the context
    entered, release = threading.Event(), threading.Event()
    encode = tokenizer.encode

    def held(text: str) -> list[int]:
        if text == maximal:
            entered.set()
            release.wait(60)
        return encode(text)

    tokenizer.encode = held
    with RouterInProcess(protected, tokenizer, Limits(max_prompt_chars=len(maximal))) as router, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        body = {"model": MODEL_NAME, "prompt": maximal, "max_tokens": 8, "temperature": 0}
        big = pool.submit(router.get, "/v1/completions", body, 120)
        assert entered.wait(30)
        assert router.get("/healthz")[0] == 200
        assert router.get("/v1/models")[1]["data"][0]["id"] == MODEL_NAME
        assert router.get("/v1/completions", {**body, "prompt": maximal + "!"})[0] == 400  # over the cap
        assert router.get("/v1/completions", {**body, "temperature": -1})[0] == 400
        assert not big.done()
        release.set()
        status, reply = big.result(timeout=120)
    assert status == 200 and reply["usage"]["completion_tokens"] == 8
    wait_pools_full(protected)


# ---- TLS and keys with the official client -----------------------------------------------------


def test_the_openai_client_works_over_tls_with_the_ca_and_the_key(protected, router_cert):
    http_client = openai.DefaultHttpxClient(verify=str(router_cert / "ca.crt"))
    base = f"https://127.0.0.1:{protected.http_port}/v1"
    client = openai.OpenAI(base_url=base, api_key=KEY, http_client=http_client, max_retries=0)
    done = client.completions.create(model=MODEL_NAME, prompt=SHORT, max_tokens=5, temperature=0)
    assert done.usage.completion_tokens == 5
    streamed = client.completions.create(model=MODEL_NAME, prompt=SHORT, max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == done.choices[0].text
    keyless = openai.OpenAI(base_url=base, api_key="sk-wrong", http_client=http_client, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        keyless.models.list()
    untrusting = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0)  # the system CAs do not know ours
    with pytest.raises(openai.APIConnectionError):
        untrusting.models.list()
    wait_pools_full(protected)


def test_a_client_that_hangs_up_mid_request_cancels_it_cleanly(protected, tls_context):
    """A non-streaming request whose client closes its socket: the request is cancelled end to
    end and the router logs no error (it used to log InvalidStateError)."""
    import socket

    body = json.dumps({"model": MODEL_NAME, "prompt": SHORT, "max_tokens": 400, "ignore_eos": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    log_before = len(protected.router.log_path.read_text())
    aborted_before = aborted(protected)
    with socket.create_connection(("127.0.0.1", protected.http_port)) as raw:
        with tls_context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            conn.sendall(head + body)
            time.sleep(0.5)  # it is decoding now
    wait_pools_full(protected)
    assert aborted(protected) == aborted_before + 1  # cancelled, not run to its 400th token
    time.sleep(0.5)  # anything the router would log about it is written by now
    logged = protected.router.log_path.read_text()[log_before:]
    assert "Error" not in logged and "Traceback" not in logged, logged


def aborted(stack: LocalStack) -> float:
    return sum(counter(scrape(f"http://127.0.0.1:{d.metrics_port}/metrics"), "pdserve:request_success_total",
                       '{finished_reason="abort"}') for d in stack.decodes)
