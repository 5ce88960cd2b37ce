"""The load-test harness: workload generators, request timing and summaries (in process), and
locust and `pdserve bench serve` against one live stack of a tiny dummy model."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.bench_admission import Done, Level, capacity, goodput, table_row
from loadtest.request import SLO, RequestRecord, StreamTimer, parse_sampling, to_request
from loadtest.run_locust import check_stats, locust_command
from loadtest.stats import summarize
from loadtest.workloads import (
    Fixed, LongShort, RequestSpec, ShareGPTLike, Tenants, make_workload, parse_params, poisson_arrivals, specs,
)
from pdserve.v1 import common_pb2

MODEL = ["--load-format", "dummy", "--preset", "tiny-llama", "--max-model-len", "512", "--kv-cache-memory", "64MiB"]
PDSERVE = [sys.executable, "-m", "services.cli.main"]


def take(workload, seed, n: int) -> list[RequestSpec]:
    stream = specs(workload, seed)
    return [next(stream) for _ in range(n)]


# --- workloads ---------------------------------------------------------------------------

def test_fixed_workload_has_exact_lengths_and_repeats_per_seed():
    w = Fixed(input_len=20, output_len=5, vocab_size=100)
    first = take(w, 3, 4)
    assert [(len(s.token_ids), s.max_tokens, s.kind) for s in first] == [(20, 5, "fixed")] * 4
    assert all(0 <= t < 100 for s in first for t in s.token_ids)
    assert take(w, 3, 4) == first
    assert take(w, 4, 4) != first


def test_tenants_share_their_prefix_and_each_request_has_its_own_suffix():
    w = Tenants(num_tenants=2, prefix_len=32, suffix_len=8, output_len=3)
    requests = take(w, 0, 40)
    assert {s.kind for s in requests} == {"tenant-0", "tenant-1"}
    for s in requests:
        tenant = int(s.kind.removeprefix("tenant-"))
        assert len(s.token_ids) == 40 and s.max_tokens == 3
        assert list(s.token_ids[:32]) == w.prefix(tenant)
    assert w.prefix(0) != w.prefix(1)
    assert len({s.token_ids[32:] for s in requests}) == 40
    # The prefixes belong to the workload, not to the request stream's seed.
    assert take(w, 99, 1)[0].token_ids[:32] in (tuple(w.prefix(0)), tuple(w.prefix(1)))


def test_tenant_skew_favours_the_first_tenants():
    kinds = [s.kind for s in take(Tenants(num_tenants=4, prefix_len=4, suffix_len=1, tenant_skew=2.0), 0, 2000)]
    counts = [kinds.count(f"tenant-{i}") for i in range(4)]
    assert counts == sorted(counts, reverse=True) and counts[0] > 3 * counts[3]


def test_long_short_mixes_the_two_kinds_at_the_given_fraction():
    w = LongShort(long_len=50, short_len=5, long_fraction=0.25, long_output_len=7, short_output_len=2)
    requests = take(w, 0, 1000)
    longs = [s for s in requests if s.kind == "long"]
    assert 200 < len(longs) < 300
    assert {(len(s.token_ids), s.max_tokens) for s in longs} == {(50, 7)}
    assert {(len(s.token_ids), s.max_tokens) for s in requests if s.kind == "short"} == {(5, 2)}
    assert {s.kind for s in take(LongShort(long_fraction=0.0, long_len=8, short_len=4), 0, 50)} == {"short"}


def test_sharegpt_like_lengths_stay_within_their_bounds():
    w = ShareGPTLike(input_median=50, input_min=10, input_max=80, output_median=20, output_min=3, output_max=40)
    requests = take(w, 0, 500)
    inputs = [len(s.token_ids) for s in requests]
    outputs = [s.max_tokens for s in requests]
    assert min(inputs) == 10 and max(inputs) == 80  # sigma 1.0 reaches both clips in 500 draws
    assert 3 <= min(outputs) and max(outputs) <= 40
    assert 40 <= sorted(inputs)[250] <= 60


def test_text_prompts_have_one_word_per_requested_token():
    spec = take(Fixed(input_len=12, output_len=2, prompt_format="text"), 0, 1)[0]
    assert spec.token_ids is None and len(spec.text.split(" ")) == 12
    assert to_request(spec, parse_sampling("")).WhichOneof("prompt") == "text"


def test_make_workload_converts_strings_and_names_what_is_wrong():
    w = make_workload("long-short", parse_params("long_len=512, long_fraction=0.5"))
    assert (w.long_len, w.long_fraction, w.short_len) == (512, 0.5, 64)
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        make_workload("nope")
    with pytest.raises(ValueError, match="has no parameter 'prefix'"):
        make_workload("tenants", {"prefix": "3"})
    with pytest.raises(ValueError, match=r"parameter long_len='x' is not a int"):
        make_workload("long-short", {"long_len": "x"})
    with pytest.raises(ValueError, match="long_fraction must be in"):
        make_workload("long-short", {"long_fraction": "2"})
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        parse_params("long_len")


def test_parse_sampling_overrides_the_greedy_ignore_eos_default():
    params = parse_sampling("temperature=0.8,seed=3,top_k=5")
    assert (params.temperature, params.seed, params.top_k, params.ignore_eos) == (0.8, 3, 5, True)
    request = to_request(RequestSpec("x", 9, token_ids=(1, 2, 3)), params)
    assert list(request.token_ids.ids) == [1, 2, 3] and request.sampling.max_tokens == 9
    with pytest.raises(ValueError, match="max_tokens comes from the workload"):
        parse_sampling("max_tokens=4")


def test_poisson_arrivals_are_increasing_within_the_duration_at_about_the_rate():
    times = poisson_arrivals(10.0, 100.0, random.Random(0))
    assert times == sorted(times) and 0 < times[0] and times[-1] < 100.0
    assert 900 < len(times) < 1100
    assert times == poisson_arrivals(10.0, 100.0, random.Random(0))


# --- timing and summaries -----------------------------------------------------------------

def response(tokens: int, finished: bool = False) -> common_pb2.GenerateResponse:
    msg = common_pb2.GenerateResponse(outputs=[common_pb2.CompletionDelta(index=0, token_ids=range(tokens))],
                                      finished=finished)
    if finished:
        msg.usage.CopyFrom(common_pb2.Usage(prompt_tokens=40, completion_tokens=4, cached_tokens=48))
        msg.disaggregation.CopyFrom(common_pb2.DisaggregationRecord(
            remote_prefill=True, decode_cached_tokens=16, prefill_cached_tokens=32, kv_bytes_shipped=1000,
            kv_transfer_ms=2.5))
    return msg


def test_stream_timer_measures_ttft_itl_tpot_and_reads_the_final_record():
    clock = iter([0.0, 0.2, 1.0, 1.5, 2.5, 3.0]).__next__
    timer = StreamTimer(RequestSpec("long", 4, token_ids=tuple(range(40))), arrival_s=7.0, clock=clock)
    timer.on_response(response(0))  # a message without tokens is not the first token
    for tokens, finished in ((1, False), (1, False), (2, True)):
        timer.on_response(response(tokens, finished))
    r = timer.finish()
    assert (r.ttft_s, r.itl_s, r.e2e_s, r.output_tokens, r.arrival_s) == (1.0, [0.5, 1.0], 3.0, 4, 7.0)
    assert r.tpot_s == pytest.approx(2.0 / 3)
    assert (r.prompt_tokens, r.cached_tokens, r.remote_prefill) == (40, 48, True)
    assert (r.decode_cached_tokens, r.prefill_cached_tokens) == (16, 32)
    assert (r.kv_bytes_shipped, r.kv_transfer_ms) == (1000, 2.5)


def test_a_stream_that_ends_without_a_token_counts_as_failed():
    timer = StreamTimer(RequestSpec("x", 4, token_ids=(1,)), clock=iter([0.0, 1.0]).__next__)
    timer.on_response(common_pb2.GenerateResponse(finished=True))
    record = timer.finish()
    assert (record.ok, record.error, record.tpot_s) == (False, "NO_TOKENS", None)


def test_summary_counts_percentiles_throughput_goodput_and_hits_exactly():
    records = [RequestRecord("a", prompt_tokens=10, output_tokens=11, ttft_s=t, e2e_s=t + 1.0, itl_s=[0.1] * 10,
                             remote_prefill=t > 0.25, decode_cached_tokens=5, prefill_cached_tokens=10 if t > 0.25 else 0)
               for t in (0.1, 0.2, 0.3, 0.4)]
    records.append(RequestRecord("b", prompt_tokens=10, error="UNAVAILABLE"))
    s = summarize(records, elapsed_s=2.0, slo=SLO(ttft_ms=250, tpot_ms=150))
    assert (s["requests"], s["completed"], s["failed"], s["errors"]) == (5, 4, 1, {"UNAVAILABLE": 1})
    assert (s["request_throughput"], s["output_throughput"], s["goodput"], s["slo_attainment"]) == (2.0, 22.0, 1.0, 0.4)
    assert s["ttft_ms"] == {"mean": 250.0, "p50": 250.0, "p90": 370.0, "p99": 397.0}
    assert s["tpot_ms"]["p50"] == pytest.approx(100.0) and s["itl_ms"]["p99"] == pytest.approx(100.0)
    assert (s["remote_prefill_fraction"], s["decode_hit_rate"], s["prefill_hit_rate"]) == (0.5, 0.5, 1.0)
    assert (s["by_kind"]["a"]["completed"], s["by_kind"]["b"]["completed"]) == (4, 0)
    assert s["by_kind"]["b"]["ttft_ms"]["p50"] is None and s["by_kind"]["b"]["decode_hit_rate"] is None
    assert summarize(records, 2.0)["goodput"] is None  # no SLO, no goodput


def test_kv_shipping_rate_is_remote_bytes_over_their_summed_transfer_time():
    def rec(remote: bool, nbytes: int, ms: float) -> RequestRecord:
        return RequestRecord("a", prompt_tokens=10, output_tokens=2, ttft_s=0.1, e2e_s=0.2, remote_prefill=remote,
                             kv_bytes_shipped=nbytes, kv_transfer_ms=ms)

    # 3 GB over 1.5 s of transfers; a local prefill and a failed request count for nothing.
    records = [rec(True, 10**9, 500.0), rec(True, 2 * 10**9, 1000.0), rec(False, 0, 0.0),
               RequestRecord("a", remote_prefill=True, kv_bytes_shipped=10**9, kv_transfer_ms=1.0, error="CANCELLED")]
    s = summarize(records, elapsed_s=1.0)
    assert (s["kv_bytes_shipped"], s["kv_transfer_gbps"], s["kv_transfer_ms"]["p50"]) == (3 * 10**9, 2.0, 750.0)
    from loadtest.stats import table_row

    row = table_row({**s, "rate": 1.0})
    assert (row["KV GB/s"], row["KV ms p50"]) == (2.0, 750.0)
    local = summarize(records[2:3], elapsed_s=1.0)
    assert (local["kv_transfer_gbps"], local["kv_transfer_ms"]["p50"]) == (None, None)
    assert table_row({**local, "rate": 1.0})["KV GB/s"] == "-"


def test_records_and_summaries_saved_before_kv_transfer_times_still_load_and_print():
    old = RequestRecord("a", kv_bytes_shipped=5).to_json()
    del old["kv_transfer_ms"]
    assert RequestRecord.from_json(old).kv_transfer_ms == 0.0
    from loadtest.stats import table_row

    summary = summarize([RequestRecord("a", output_tokens=1, ttft_s=0.1, e2e_s=0.1)], elapsed_s=1.0)
    for key in ("kv_transfer_gbps", "kv_transfer_ms"):
        del summary[key]
    assert table_row({**summary, "rate": 1.0})["KV ms p50"] == "-"


# --- the admission benchmark's arithmetic (loadtest/bench_admission.py) ------------------


def test_capacity_is_the_smallest_concurrency_within_five_percent_of_the_best_throughput():
    assert capacity({1: 10.0, 2: 19.0, 4: 30.0, 8: 31.0, 16: 30.5, 32: 29.0}) == 4  # 30 >= 0.95 x 31
    assert capacity({1: 10.0, 2: 19.0, 4: 29.0, 8: 31.0}) == 8  # 29 < 29.45
    assert capacity({1: 10.0, 2: 20.0}, tolerance=0.5) == 1
    with pytest.raises(ValueError):
        capacity({})


def admission_level() -> Level:
    records = [RequestRecord("fixed", output_tokens=32, ttft_s=t, e2e_s=t + 1.0, arrival_s=1.0) for t in (0.05, 0.1, 0.2)]
    records.append(RequestRecord("fixed", arrival_s=1.0, error="UNAVAILABLE"))
    # The second request was refused first: its client first tried it 0.5 s before it was admitted
    # (client TTFTs 50, 600, 200 ms).
    done = [Done(r, first_try_s=0.5 if i == 1 else 1.0) for i, r in enumerate(records)]
    return Level(concurrency=8, window_s=2.0, done=done, refusals_s=[0.01, 0.03])


def test_goodput_counts_completed_requests_within_the_ttft_slo_per_second_of_window():
    completed = admission_level().completed()
    assert goodput(completed, 2.0, SLO(ttft_ms=100)) == (1.0, 32.0)  # 50 and 100 ms meet it, 200 ms does not
    assert goodput(completed, 2.0, SLO(ttft_ms=40)) == (0.0, 0.0)


def test_admission_table_row_reports_admitted_latencies_refusals_and_the_clients_wait():
    row = table_row("admission on, queue 2", 2, admission_level(), SLO(ttft_ms=100))
    assert row == {
        "system": "admission on, queue 2", "load": "2x", "clients": 8, "completed": 3, "failed": 1, "refused": 2,
        "req/s": 1.5, "goodput req/s": 1.0, "goodput tok/s": 32.0, "TTFT p50": 100.0, "TTFT p99": 198.0,
        "E2E p99": 1198.0, "client TTFT p99": 592.0, "refusal p50": 20.0,
    }


def test_locust_reports_a_refused_connection_as_failures_with_the_status(tmp_path):
    from services.cli.stack import free_port

    command = locust_command(f"127.0.0.1:{free_port()}", 1, 1, "2s", tmp_path / "l", ["--request-timeout", "1"])
    proc = subprocess.run(["timeout", "-s", "KILL", "90", *command], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]  # locust's exit code when requests failed
    assert "UNAVAILABLE" in (tmp_path / "l_failures.csv").read_text()
    problems = check_stats(tmp_path / "l_stats.csv")
    assert problems[0].startswith("Generate e2e: ") and "no TTFT entry with requests" in problems


def test_bench_serve_names_a_bad_parameter_or_an_unreachable_router_and_exits_2():
    from services.cli.stack import free_port

    url = f"127.0.0.1:{free_port()}"
    bad = subprocess.run([*PDSERVE, "bench", "serve", "--url", url, "--workload", "tenants",
                          "--workload-params", "tenants=3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "workload 'tenants' has no parameter 'tenants'" in bad.stderr
    down = subprocess.run([*PDSERVE, "bench", "serve", "--url", url, "--rates", "1", "--duration", "1"],
                          capture_output=True, text=True, timeout=120)
    assert down.returncode == 2, down.stderr[-2000:]
    assert f"warm-up request failed with UNAVAILABLE; is a router serving at {url}?" in down.stderr


# --- against a live stack -----------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from services.cli.stack import LocalStack

    # One thread per worker: tiny matrices gain nothing from OpenMP on a busy machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with LocalStack(MODEL, num_prefill=1, num_decode=1, env=env, log_dir=tmp_path_factory.mktemp("stack")) as s:
        yield s


@pytest.mark.slow
def test_headless_locust_run_reports_ttft_tpot_e2e_without_failures(stack, tmp_path):
    command = locust_command(stack.router_address, 2, 2, "4s", tmp_path / "l",
                             ["--workload", "long-short", "--workload-seed", "101", "--workload-params",
                              "long_len=80,short_len=8,long_output_len=4,short_output_len=4"])
    proc = subprocess.run(["timeout", "-s", "KILL", "120", *command], capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert check_stats(tmp_path / "l_stats.csv") == []
    names = (tmp_path / "l_stats.csv").read_text()
    assert all(f"Generate {entry}" in names for entry in ("TTFT", "TPOT", "e2e"))


@pytest.mark.slow
def test_bench_serve_at_two_rates_writes_consistent_results_and_plots(stack, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [*PDSERVE, "bench", "serve", "--url", stack.router_address, "--workload", "long-short",
         "--workload-params", "long_len=80,short_len=8,long_output_len=4,short_output_len=4,long_fraction=0.5",
         "--rates", "2,4", "--duration", "3", "--slo-ttft-ms", "2000", "--slo-tpot-ms", "1000",
         "--seed", "11", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("| rate | done | failed |")
    data = json.loads((out / "results.json").read_text())
    assert [r["rate"] for r in data["rates"]] == [2.0, 4.0] and data["config"]["workload"] == "long-short"
    for rate in data["rates"]:
        s, records = rate["summary"], rate["requests"]
        assert s["requests"] == len(records) == s["completed"] + s["failed"] and s["failed"] == 0
        assert s["arrival_rate"] == round(s["requests"] / 3, 4)
        assert s["completed"] == sum(k["completed"] for k in s["by_kind"].values()) > 0
        assert s["output_tokens"] == 4 * s["completed"]
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            d = s[metric]
            assert 0 < d["p50"] <= d["p90"] <= d["p99"], (metric, d)
        assert 0 <= s["goodput"] <= s["request_throughput"]
        # Long prompts (80 uncached tokens > the router's threshold of 64) prefill remotely.
        assert set(s["by_kind"]) <= {"long", "short"}
        assert s["by_kind"].get("long", {}).get("remote_prefill_fraction", 1.0) == 1.0
        assert s["by_kind"].get("short", {}).get("remote_prefill_fraction", 0.0) == 0.0
    kinds = {kind for rate in data["rates"] for kind in rate["summary"]["by_kind"]}
    assert kinds == {"long", "short"}
    for name in ("latency_cdf.png", "throughput_vs_rate.png", "latency_vs_rate.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_benchmark_api_records_prefix_cache_hits_of_tenants(stack):
    from loadtest.benchmark import run_benchmark

    workload = Tenants(num_tenants=2, prefix_len=64, suffix_len=8, output_len=2, prefix_seed=12345)
    result = run_benchmark(stack.router_address, workload, [4.0], 2.0, warmup=0, seed=12, progress=False)
    records = result.rates[0].records
    assert all(r.ok for r in records) and len(records) >= 3
    # Decode holds a tenant's 4 prefix blocks once one request of that tenant has finished.
    assert {r.decode_cached_tokens for r in records} <= {0, 64}
    assert sum(r.decode_cached_tokens == 64 for r in records) >= len(records) - 4
    assert result.rates[0].summary["decode_hit_rate"] > 0


@pytest.mark.slow
def test_bench_routing_keeps_each_tenant_home_under_prefix_and_writes_its_section(tmp_path):
    """Four tenants whose prefixes (4 blocks each) do not all fit in one instance's 16 blocks
    next to the requests' own blocks: prefix routing keeps each tenant on one instance (even a
    3/1 split fits) and its prefix cached; round-robin sends every tenant to both, and the
    caches churn."""
    from loadtest.bench_routing import main as bench_routing

    record = tmp_path / "B.md"
    results = bench_routing([
        "--model-args", "--load-format dummy --preset tiny-llama --max-model-len 128", "--systems",
        "prefix,round_robin", "--rates", "3", "--duration", "4", "--tenants", "4", "--prefix-len", "64",
        "--suffix-len", "16", "--output", "4", "--blocks-per-instance", "16", "--threads", "2",
        "--no-progress", "--write", str(record)])
    assert set(results) == {"prefix", "round_robin"}
    summary = {}
    for name, result in results.items():
        (rate,) = result.rates
        assert rate.records and all(r.ok for r in rate.records), name
        homes = {}
        for r in rate.records:
            homes.setdefault(r.kind, set()).add(r.decode_instance)
        summary[name] = rate.summary["decode_hit_rate"], homes
    prefix_hits, prefix_homes = summary["prefix"]
    rr_hits, rr_homes = summary["round_robin"]
    assert all(len(h) == 1 for h in prefix_homes.values()), prefix_homes
    assert len(set().union(*prefix_homes.values())) == 2  # the tenants are spread over both
    assert any(len(h) == 2 for h in rr_homes.values()), rr_homes
    # The best possible hit rate is 64 of 80 prompt tokens; a tenant's repeat always hits.
    assert 0.7 <= prefix_hits <= 0.8 and rr_hits < prefix_hits
    text = record.read_text()
    assert "<!-- bench_routing:begin -->" in text and "| prefix | 3 |" in text and "| round_robin | 3 |" in text


# --- several client processes (loadtest/clients.py, `pdserve bench serve --clients N`) -------

def wait_all_free(stack, timeout: float) -> None:
    """Every worker holds no request and no KV block (imported late: test_services loads the engine)."""
    from tests.test_services import wait_all_free as wait

    wait(stack, timeout)


def test_clients_deal_requests_round_robin_and_split_closed_loop_slots():
    from loadtest import clients

    assert [list(clients.share(iter(range(10)), k, 3)) for k in range(3)] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [clients.slots(7, k, 3) for k in range(3)] == [3, 2, 2]
    assert [clients.slots(2, k, 3) for k in range(3)] == [1, 1, 0]
    with pytest.raises(ValueError):
        clients.Level(10.0, rate=1.0, concurrency=4)


def test_steady_tokens_count_the_messages_that_arrived_within_the_window():
    from loadtest.stats import tokens_before

    # Messages at 1.5, 2.0, 2.5 (2 tokens each) and at 0.5, 3.5 (1 token each); a failure counts nothing.
    records = [RequestRecord("a", output_tokens=6, arrival_s=1.0, ttft_s=0.5, e2e_s=2.0, itl_s=[0.5, 0.5]),
               RequestRecord("a", output_tokens=2, arrival_s=0.0, ttft_s=0.5, e2e_s=4.0, itl_s=[3.0]),
               RequestRecord("a", output_tokens=3, arrival_s=0.0, error="UNAVAILABLE")]
    assert tokens_before(records, 2.0) == 5.0
    assert tokens_before(records, 10.0) == 8.0


def test_a_client_process_above_85_percent_of_a_core_is_named_as_saturated():
    from loadtest.clients import ClientUsage
    from services.cli.bench import client_report

    usage = [ClientUsage(0, cpu_s=4.5, wall_s=10.0), ClientUsage(1, cpu_s=9.0, wall_s=10.0)]
    assert [u.saturated for u in usage] == [False, True]
    lines = client_report({"rate": 2.0, "clients": [u.to_json() for u in usage]})
    assert lines[0] == "rate 2: client CPU #0 45%, #1 90% of a core"
    assert lines[1:] == ["warning: client process #1 used 90% of a core: it was saturated, so these numbers "
                         "measure the client; run with more --clients"]


def test_process_tree_names_a_childs_children_after_it_and_counts_their_cpu(tmp_path):
    from loadtest.proc_cpu import MachineCpu, ProcessTree

    child = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    try:
        for _ in range(100):
            tree = ProcessTree.snapshot(os.getpid())
            if any(comm == "sleep" for comm, parent, _ in tree.procs.values() if parent == child.pid):
                break
        names = {tree.name(pid, {child.pid: "worker"}) for pid in tree.procs}
        assert {"worker", "worker/sleep"} <= names
        assert all(seconds >= 0 for seconds in tree.since(tree).values())
        assert MachineCpu.read().total > 0
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_bench_serve_spreads_an_open_and_a_closed_loop_over_two_client_processes(stack, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [*PDSERVE, "bench", "serve", "--url", stack.router_address, "--workload", "fixed",
         "--workload-params", "input_len=16,output_len=4", "--rates", "8", "--concurrency", "3", "--duration", "2",
         "--clients", "2", "--seed", "5", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["clients"] == 2
    open_loop, closed_loop = (r["summary"] for r in data["rates"])
    # Two clients send what one would: every arrival of the seeded open loop, once.
    assert open_loop["requests"] == len(poisson_arrivals(8.0, 2.0, random.Random("arrivals:5:0")))
    assert closed_loop["concurrency"] == 3 and closed_loop["requests"] >= 3
    assert closed_loop["steady_output_throughput"] > 0
    for s in (open_loop, closed_loop):
        assert s["failed"] == 0 and s["output_tokens"] == 4 * s["completed"]
        assert [c["index"] for c in s["clients"]] == [0, 1]
        assert all(0 < c["cpu_s"] and 0 < c["wall_s"] and isinstance(c["saturated"], bool) for c in s["clients"])
    assert "| c=3 |" in proc.stdout and "c=3: client CPU #0 " in proc.stdout
    wait_all_free(stack, timeout=30)


@pytest.mark.slow
def test_two_client_processes_stream_openai_completions_and_count_every_chunk(stack, tmp_path):
    proc = subprocess.run(
        [*PDSERVE, "bench", "serve", "--protocol", "openai", "--url", f"127.0.0.1:{stack.http_port}", "--workload",
         "fixed", "--workload-params", "input_len=16,output_len=5", "--concurrency", "2", "--duration", "1.5",
         "--clients", "2", "--seed", "3", "--out", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    records, summary = data["rates"][0]["requests"], data["rates"][0]["summary"]
    assert data["config"]["protocol"] == "openai" and summary["failed"] == 0 and len(records) >= 2
    # usage.completion_tokens of the last chunk; at most one token-carrying chunk per token.
    assert all(r["output_tokens"] == 5 and r["prompt_tokens"] == 16 and len(r["itl_s"]) <= 4 for r in records)
    assert len(summary["clients"]) == 2
    wait_all_free(stack, timeout=30)


def test_profile_serve_tables_cpu_per_streamed_token_per_process_and_their_medians(tmp_path):
    """loadtest/profile_serve.py --from: an earlier run's numbers give exact tables and a section."""
    from loadtest import profile_serve

    def window(protocol: str, router_s: float, tps: float) -> dict:
        summary = {"steady_output_throughput": tps, "tpot_ms": {"p50": 50.0}, "failed": 0,
                   "clients": [{"cpu_fraction": 0.5}, {"cpu_fraction": 0.9}]}
        cpu = {"router": router_s, "decode-0": 4.0, f"{protocol}-client-0": 0.5, f"{protocol}-client-1": 0.5}
        return {"protocol": protocol, "summary": summary, "tokens": 10_000, "messages": 5_000, "wall_s": 10.0,
                "cpu_s": cpu, "busy_cores": 2.0, "load1": 3.0}

    saved = {"args": {"repeats": 2, "concurrency": 8, "duration": 10.0, "clients": 2, "label": "x"},
             "offline": [{"output_tokens": 1000, "output_tokens_per_s": 2000.0, "cpu_s": 0.3}] * 2,
             "grpc": [window("grpc", 1.0, 1000.0), window("grpc", 2.0, 1500.0)],
             "openai": [window("openai", 1.0, 800.0), window("openai", 1.0, 800.0)]}
    (tmp_path / "run.json").write_text(json.dumps(saved))
    report = tmp_path / "B.md"
    sys_argv = ["profile_serve", "--from", str(tmp_path / "run.json"), "--write", str(report)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", sys_argv)
        profile_serve.main()
    text = report.read_text()
    assert "<!-- profile_serve_x:begin -->" in text and "closed loop of 8 streams for 10 s from 2" in text
    # Run 0: router 1 s over 10,000 tokens = 100 µs/token; decode 400; the clients 100 together; 2 cores busy,
    # ours 0.6 of them, so others' 1.4; the busiest client at 90% of a core.
    assert "| 0 | 3.00 | 2.00 | 1.40 | 2,000 | 1,000 | 0.50 | 300 | 600 | 50.0 | 2.00 | 100 | 400 | 100 | 90% | 0 |" in text
    assert "| median | 3.00 | 2.00 | 1.35 | 2,000 | 1,250 | 0.62 | 300 | 650 | 50.0 | 2.00 | 150 | 400 | 100 | 90% | 0 |" in text
    # SSE: per chunk (5,000 of them): the router 200 µs; decode still per token.
    assert "| 0 | 3.00 | 2.00 | 1.40 | 800 | 0.40 | 50.0 | 2.00 | 200 | 400 | 200 | 90% | 0 |" in text
    assert "| router | 15% | 150 | 10% | 200 |" in text
