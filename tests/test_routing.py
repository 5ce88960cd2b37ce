"""Cache-aware routing end to end: router + 1 prefill + 2 decode workers as real processes,
joined through a real redis-server that the tests kill and restart (tiny dummy model).

Tenants have distinct 200-token prefixes (12 full blocks of 16 = 192 cacheable tokens) and send
repeat requests with fresh 20-token suffixes. The tests run in file order and share one stack.
"""

from __future__ import annotations

import concurrent.futures
import re
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
import redis

from pdserve.v1 import router_pb2_grpc
from services.cli.stack import LocalStack, free_port
from services.engine import SamplingParams
from services.engine.block_hash import hash_blocks
from services.fleet import schema
from services.fleet.redis_server import RedisServer
from tests.test_services import MODEL, decode_directly, generate, wait_all_free

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

PREFIX_TOKENS, CACHED = 200, 192  # a prefix of 200 tokens holds 12 whole blocks
PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
_suffixes = iter(range(40000, 49000, 20))


def prefix(tenant: int) -> list[int]:
    return list(range(1000 + 400 * tenant, 1000 + 400 * tenant + PREFIX_TOKENS))


def prompt(tenant: int) -> list[int]:
    start = next(_suffixes)
    return prefix(tenant) + list(range(start, start + 20))


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(free_port(), log_path=tmp_path_factory.mktemp("redis") / "redis.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    s = LocalStack(MODEL, num_prefill=1, num_decode=2, log_dir=tmp_path_factory.mktemp("stack"),
                   redis_url=redis_server.url, router_argv=["--imbalance-threshold", "4"])
    s.start(timeout=300)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def holders() -> dict[int, str]:
    """tenant -> the decode instance its first request went to (filled by the first test)."""
    return {}


def router_stub(stack: LocalStack):
    return router_pb2_grpc.RouterStub(grpc.insecure_channel(stack.router_address))


def send(stack: LocalStack, tenant: int):
    return generate(router_stub(stack), prompt(tenant), PARAMS, timeout=60)


def indexed_blocks(url: str, instance_id: str, tenant: int) -> int:
    """How many of `tenant`'s prefix blocks `instance_id`'s block set in Redis holds."""
    client = redis.Redis.from_url(url, decode_responses=True)
    epoch = client.hget(schema.record_key(instance_id), "epoch")
    if epoch is None:
        return 0
    key = schema.blocks_key(instance_id, int(epoch))
    return sum(client.sismember(key, schema.hash_hex(h)) for h in hash_blocks(prefix(tenant), 16))


def wait_indexed(url: str, instance_id: str, tenant: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while indexed_blocks(url, instance_id, tenant) < CACHED // 16:
        assert time.monotonic() < deadline, f"tenant {tenant}'s prefix never reached {instance_id}'s index"
        time.sleep(0.05)


def router_metric(stack: LocalStack, name: str, port: int | None = None, **labels: str) -> float:
    """A metric's value on the router (or on the process whose metrics port is `port`)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port or stack.http_port}/metrics", timeout=5).read().decode()
    # Every series also has model_name (labels are sorted): tolerate labels beyond those asked for.
    wanted = "".join(rf'(?=[^}}]*\b{re.escape(k)}="{re.escape(v)}")' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}" + (rf"\{{{wanted}[^}}]*\}}" if labels else r"(?:\{[^}]*\})?") + r" (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def decisions(stack: LocalStack, reason: str) -> float:
    return router_metric(stack, "pdserve:routing_decisions_total", policy="prefix", role="decode", reason=reason)


def assert_hit(result, decode_id: str) -> None:
    d = result.disaggregation
    assert (d.decode_instance, d.remote_prefill) == (decode_id, False)  # 28 uncached tokens: local prefill
    assert d.decode_cached_tokens >= CACHED


# ---- routing by the index ------------------------------------------------------------------------


def test_each_tenants_repeats_land_on_the_decode_holding_its_prefix(stack, holders):
    for tenant in range(3):
        first = send(stack, tenant)
        holders[tenant] = first.disaggregation.decode_instance
        assert first.disaggregation.remote_prefill and first.disaggregation.decode_cached_tokens == 0
        wait_indexed(stack.redis_url, holders[tenant], tenant)
    assert set(holders.values()) == {"decode-0", "decode-1"}  # a new prefix goes to the emptier cache
    for _ in range(2):
        for tenant in range(3):
            assert_hit(send(stack, tenant), holders[tenant])
    assert decisions(stack, "prefix_hit") == 6
    assert router_metric(stack, "pdserve:routing_cached_tokens_total") >= 6 * CACHED
    for worker in (*stack.decodes, *stack.prefills):
        assert router_metric(stack, "pdserve:fleet_registered", worker.metrics_port) == 1
        assert router_metric(stack, "pdserve:prefix_index_lag_seconds_count", worker.metrics_port) > 0
    wait_all_free(stack)


def test_a_restarted_router_routes_from_the_index_not_its_memory(stack, holders):
    first = send(stack, 3)
    holders[3] = first.disaggregation.decode_instance
    wait_indexed(stack.redis_url, holders[3], 3)
    stack.restart_router()
    assert_hit(send(stack, 3), holders[3])
    assert decisions(stack, "prefix_hit") == 1  # the fresh router's only decision
    wait_all_free(stack)


def test_a_decode_warmed_directly_gets_that_prefix_from_the_router(stack):
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)

    def cached_blocks(c):
        return client.scard(schema.blocks_key(c.instance_id, int(client.hget(schema.record_key(c.instance_id), "epoch"))))

    # Warm the instance that a new prefix would NOT go to (the fuller cache), bypassing the router.
    target = max(stack.decodes, key=lambda c: (cached_blocks(c), c.instance_id))
    warm = decode_directly(target, prompt(4), "", PARAMS)
    assert warm.disaggregation.decode_computed_prompt_tokens == PREFIX_TOKENS + 20
    wait_indexed(stack.redis_url, target.instance_id, 4)
    assert_hit(send(stack, 4), target.instance_id)
    wait_all_free(stack)


def test_a_hot_tenant_burst_is_spread_once_the_imbalance_gate_trips(stack, holders):
    gated = decisions(stack, "imbalance")
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    stub = router_stub(stack)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: generate(stub, prompt(0), params, timeout=120), range(16)))
    served = [r.disaggregation.decode_instance for r in results]
    assert all(r.completions[0].finish_reason == "length" for r in results)
    assert decisions(stack, "imbalance") > gated
    assert served.count(holders[0]) >= 4 and set(served) == {"decode-0", "decode-1"}, served
    wait_all_free(stack)


# ---- faults --------------------------------------------------------------------------------------


def test_redis_killed_mid_run_fails_no_request_and_hits_recover(stack, redis_server, holders):
    stub = router_stub(stack)
    tenants = [t for t in range(4) for _ in range(3)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        during = pool.map(lambda t: generate(stub, prompt(t), PARAMS, timeout=60), tenants)
        time.sleep(0.2)
        redis_server.kill()  # mid-run: some requests are in flight, the rest come during the outage
        results = list(during)
        outage = [generate(stub, prompt(t), PARAMS, timeout=60) for t in range(4)]
    try:
        assert all(r.completions[0].finish_reason == "length" for r in [*results, *outage])
        # The router notices at its next registry refresh, which may come after the requests.
        deadline = time.monotonic() + 10
        while router_metric(stack, "pdserve:redis_up") != 0:
            assert time.monotonic() < deadline, "the router never noticed Redis was gone"
            time.sleep(0.1)
    finally:
        redis_server.start()  # empty, as a Redis without persistence comes back
    stack.wait_registered([*stack.prefills, *stack.decodes], timeout=30)
    for tenant in range(4):
        wait_indexed(stack.redis_url, holders[tenant], tenant)  # resynced from the workers' caches
    deadline = time.monotonic() + 10
    while router_metric(stack, "pdserve:redis_up") != 1:
        assert time.monotonic() < deadline, "the router never read Redis again"
        time.sleep(0.1)
    hits = decisions(stack, "prefix_hit")
    for tenant in range(4):
        # Load-only routing during the outage may have cached a tenant on the other decode too.
        d = send(stack, tenant).disaggregation
        assert d.decode_cached_tokens >= CACHED and not d.remote_prefill
        assert indexed_blocks(stack.redis_url, d.decode_instance, tenant) == CACHED // 16
    assert decisions(stack, "prefix_hit") == hits + 4
    wait_all_free(stack)


def test_a_worker_with_another_block_size_is_refused_at_start_up(stack):
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "decode", "--port", str(port), "--metrics-port", "0",
         "--instance-id", "decode-odd", "--redis", stack.redis_url, "--block-size", "32", *MODEL],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "decode decode-odd cannot join the fleet: block_size is '32' here but '16'" in proc.stderr
    assert not redis.Redis.from_url(stack.redis_url).exists(schema.record_key("decode-odd"))
