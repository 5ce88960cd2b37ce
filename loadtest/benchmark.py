"""The serving benchmark: an open-loop gRPC client with Poisson arrivals at each rate.

    result = run_benchmark("127.0.0.1:50051", make_workload("long-short"), rates=[0.5, 1, 2],
                           duration=60, slo=SLO(ttft_ms=2000, tpot_ms=200))
    result.save(out_dir)            # results.json; loadtest.plots.plot_results for the PNGs

Open loop: requests are sent at their arrival times whether or not earlier ones finished,
so an overloaded server shows up as growing latency, not as a client that slowed down. Each
rate gets its own prompts (seeded by seed and rate index: no prompt repeats across rates, so
no rate is served from an earlier rate's prefix cache; a `tenants` workload still shares its
prefixes, by design) and its own arrival times; the same seed gives the same requests, so two
stacks measured with the same arguments see identical traffic. All it needs is the router's
address. After the last arrival it waits for every request to end (each has a deadline of
`request_timeout` seconds; one that runs out counts as failed with DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from tqdm import tqdm

from loadtest.request import DEFAULT_SAMPLING, SLO, RequestRecord, StreamTimer, to_request
from loadtest.stats import summarize
from loadtest.workloads import RequestSpec, Workload, params_of, poisson_arrivals, specs
from pdserve.v1 import router_pb2_grpc
from services.engine.sampling_params import SamplingParams
from services.rpc.server import CHANNEL_OPTIONS

class BenchmarkError(RuntimeError):
    """The benchmark cannot run (the warm-up request failed)."""


@dataclass
class RateResult:
    rate: float
    summary: dict
    records: list[RequestRecord]


@dataclass
class BenchResult:
    """Everything one run measured: its configuration, and per rate a summary and every request."""

    config: dict
    rates: list[RateResult]

    def to_json(self) -> dict:
        return {"config": self.config,
                "rates": [{"rate": r.rate, "summary": r.summary, "requests": [x.to_json() for x in r.records]}
                          for r in self.rates]}

    @classmethod
    def from_json(cls, data: dict) -> BenchResult:
        rates = [RateResult(r["rate"], r["summary"], [RequestRecord.from_json(x) for x in r["requests"]])
                 for r in data["rates"]]
        return cls(data["config"], rates)

    def save(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "results.json"
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, path: Path) -> BenchResult:
        return cls.from_json(json.loads(path.read_text()))


def run_benchmark(
    url: str,
    workload: Workload,
    rates: list[float],
    duration: float,
    slo: SLO = SLO(),
    *,
    sampling: SamplingParams = DEFAULT_SAMPLING,
    seed: int = 0,
    warmup: int = 1,
    request_timeout: float = 600.0,
    progress: bool = True,
) -> BenchResult:
    """Run every rate (requests/s) for `duration` seconds of arrivals against the router at
    `url`, after `warmup` unmeasured requests drawn from the workload."""
    return asyncio.run(benchmark(url, workload, rates, duration, slo, sampling=sampling, seed=seed,
                                 warmup=warmup, request_timeout=request_timeout, progress=progress))


async def benchmark(
    url: str, workload: Workload, rates: list[float], duration: float, slo: SLO = SLO(), *,
    sampling: SamplingParams = DEFAULT_SAMPLING, seed: int = 0, warmup: int = 1,
    request_timeout: float = 600.0, progress: bool = True,
) -> BenchResult:
    """`run_benchmark` for callers already inside an event loop."""
    if not rates or any(r <= 0 for r in rates) or duration <= 0:
        raise ValueError(f"rates and duration must be > 0, got {rates}, {duration}")
    config = {
        "url": url, "workload": workload.name, "workload_params": params_of(workload), "rates": list(rates),
        "duration_s": duration, "slo": asdict(slo), "seed": seed, "warmup": warmup,
        "sampling": {k: v for k, v in asdict(sampling).items() if k != "max_tokens"},
    }
    results = []
    async with grpc.aio.insecure_channel(url, options=CHANNEL_OPTIONS) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for spec in itertools.islice(specs(workload, f"warmup:{seed}"), warmup):
            record = await _one(stub, spec, sampling, 0.0, request_timeout)
            if not record.ok:
                raise BenchmarkError(f"warm-up request failed with {record.error}; is a router serving at {url}?")
        for index, rate in enumerate(rates):
            requests = specs(workload, f"rate:{seed}:{index}")
            arrivals = poisson_arrivals(rate, duration, random.Random(f"arrivals:{seed}:{index}"))
            records, elapsed = await _run_rate(stub, requests, arrivals, sampling, request_timeout,
                                               _bar(progress, len(arrivals), rate))
            summary = {"rate": rate, "arrival_rate": round(len(arrivals) / duration, 4),
                       **summarize(records, elapsed, slo)}
            results.append(RateResult(rate, summary, records))
    return BenchResult(config, results)


async def _run_rate(stub, requests, arrivals: list[float], sampling: SamplingParams, timeout: float,
                    bar: tqdm) -> tuple[list[RequestRecord], float]:
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def send(spec: RequestSpec, at: float) -> RequestRecord:
        record = await _one(stub, spec, sampling, at, timeout)
        bar.update(1)
        return record

    tasks = []
    for spec, at in zip(requests, arrivals):  # requests is endless; arrivals bound it
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        tasks.append(asyncio.create_task(send(spec, at)))
    records = list(await asyncio.gather(*tasks))
    elapsed = loop.time() - start
    bar.close()
    return records, max(elapsed, 1e-9)


async def _one(stub, spec: RequestSpec, sampling: SamplingParams, at: float, timeout: float) -> RequestRecord:
    timer = StreamTimer(spec, at)
    try:
        async for response in stub.Generate(to_request(spec, sampling), timeout=timeout):
            timer.on_response(response)
    except grpc.aio.AioRpcError as e:
        return timer.fail(e.code().name)
    return timer.finish()


def _bar(enabled: bool, total: int, rate: float) -> tqdm:
    return tqdm(total=total, desc=f"rate {rate:g}/s", unit="req", disable=not enabled)


__all__ = ["BenchResult", "BenchmarkError", "DEFAULT_SAMPLING", "RateResult", "SLO", "benchmark", "run_benchmark"]
