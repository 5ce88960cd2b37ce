"""The serving benchmark: Poisson arrivals at each rate (open loop) or a fixed number of
requests in flight (closed loop), from one or several client processes (loadtest/clients.py).

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

Closed loop (`concurrencies`): each of C slots sends its next request as soon as its last one
ends, until `duration` has passed; the way to find the service's saturation throughput
without an ever-growing queue. `clients=N` deals every level over N client processes; each
summary lists every client's CPU use (`clients`, `saturated_clients`): a client above 85% of a
core measured itself.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from loadtest.clients import (
    ClientError, ClientPool, Level, Outcome, Target, level_seeds, make_sender, measured_share, warm_up,
)
from loadtest.request import DEFAULT_SAMPLING, SLO, RequestRecord
from loadtest.stats import summarize, tokens_before
from loadtest.workloads import Workload, params_of, poisson_arrivals
from services.engine.sampling_params import SamplingParams


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
    clients: int = 1,
    concurrencies: list[int] = (),
    protocol: str = "grpc",
    model: str = "",
) -> BenchResult:
    """Run every rate (requests/s, open loop), then every concurrency (closed loop), for
    `duration` seconds of sending each against the router at `url`, after `warmup` unmeasured
    requests drawn from the workload. `clients` > 1 spreads each level over that many client
    processes (loadtest/clients.py); each summary says how busy every client was.
    `protocol` "openai" sends /v1/completions streams to `url` = http://HOST:PORT, naming `model`."""
    levels = _levels(rates, concurrencies, duration)
    target = Target(url, protocol, sampling, request_timeout, model)
    config = {
        "url": url, "protocol": protocol, "workload": workload.name, "workload_params": params_of(workload),
        "rates": list(rates), "concurrencies": list(concurrencies), "duration_s": duration, "slo": asdict(slo),
        "seed": seed, "warmup": warmup, "clients": clients,
        "sampling": {k: v for k, v in asdict(sampling).items() if k != "max_tokens"},
    }
    if clients == 1:
        results = asyncio.run(_in_process(target, workload, levels, slo, seed, warmup, progress))
        return BenchResult(config, results)
    results = []
    try:
        with ClientPool(target, workload, clients, seed, warmup) as pool:
            for index, level in enumerate(levels):
                if progress:
                    print(f"{level.label()}: {clients} client processes, {level.duration:g} s", flush=True)
                results.append(rate_result(level, pool.run(level, level_seeds(seed, index)), slo))
    except ClientError as e:
        raise BenchmarkError(f"{e}; is a router serving at {url}?") from None
    return BenchResult(config, results)


def _levels(rates: list[float], concurrencies: list[int], duration: float) -> list[Level]:
    if (not rates and not concurrencies) or any(r <= 0 for r in rates) or any(c < 1 for c in concurrencies) \
            or duration <= 0:
        raise ValueError(f"rates, concurrencies and duration must be > 0, got {rates}, {concurrencies}, {duration}")
    return [*(Level(duration, rate=r) for r in rates), *(Level(duration, concurrency=c) for c in concurrencies)]


async def _in_process(target: Target, workload: Workload, levels: list[Level], slo: SLO, seed: int, warmup: int,
                      progress: bool) -> list[RateResult]:
    """One client: this process and its event loop (what `pdserve bench serve` always did)."""
    sender = make_sender(target)
    try:
        try:
            await warm_up(sender.one, workload, seed, warmup)
        except ClientError as e:
            raise BenchmarkError(f"{e}; is a router serving at {target.url}?") from None
        results = []
        for index, level in enumerate(levels):
            total = None if level.closed else len(poisson_arrivals(level.rate, level.duration,
                                                                    random.Random(level_seeds(seed, index)[1])))
            bar = tqdm(total=total, desc=level.label() if level.closed else f"rate {level.rate:g}/s", unit="req",
                       disable=not progress)
            start = time.monotonic() + 0.01
            records, end, usage = await measured_share(sender.one, workload, level, level_seeds(seed, index), 0, 1,
                                                       start, lambda: bar.update(1))
            bar.close()
            results.append(rate_result(level, Outcome(records, max(end - start, 1e-9), [usage]), slo))
        return results
    finally:
        await sender.close()


def rate_result(level: Level, outcome: Outcome, slo: SLO) -> RateResult:
    """A level's summary: the usual one (loadtest/stats.py), the level, and the clients' CPU.
    A closed loop's summary also has its steady throughput: tokens that arrived while the slots
    were still sending, over `duration` (the drain after it runs at a falling concurrency)."""
    records, elapsed = outcome.records, outcome.elapsed_s
    if level.closed:
        head = {"rate": float(level.concurrency), "concurrency": level.concurrency,
                "steady_output_throughput": round(tokens_before(records, level.duration) / level.duration, 3)}
    else:
        head = {"rate": level.rate, "arrival_rate": round(len(records) / level.duration, 4)}
    summary = {**head, **summarize(records, elapsed, slo),
               "clients": [u.to_json() for u in outcome.usage],
               "saturated_clients": sum(u.saturated for u in outcome.usage)}
    return RateResult(summary["rate"], summary, records)


__all__ = ["BenchResult", "BenchmarkError", "DEFAULT_SAMPLING", "RateResult", "SLO", "run_benchmark"]
