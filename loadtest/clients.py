"""Load from one or several client processes, so that the benchmark client is never the limit.

A load level is open loop (Poisson arrivals at `rate` req/s) or closed loop (`concurrency`
requests in flight, each slot sending its next request when the last one ends), for
`duration` seconds of sending. With N clients, client k sends arrivals k, k+N, k+2N, ... of
the open loop, or its share of the closed loop's slots, from its own process (multiprocessing
spawn: a fresh interpreter with its own event loop and channel). Every client measures its own
CPU time over the level's wall time: a client that needs a whole core measures itself, not
the server, and the caller says so (`ClientUsage.saturated`).

    with ClientPool(target, workload, clients=4, seed=0, warmup=1) as pool:
        outcome = pool.run(Level(duration=30, concurrency=256), level_seeds(seed=0, level_index=0))

Requests go over gRPC (the router's Generate) or over HTTP (/v1/completions, stream=true: one
token-carrying SSE chunk is one message of the record's ITL, exactly as a gRPC message is).
Between the parent and its clients only our own values travel (multiprocessing pipes on this
machine); records come back as plain dicts.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing as mp
import queue
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from loadtest.request import RequestRecord, StreamTimer, to_request
from loadtest.workloads import RequestSpec, Workload, poisson_arrivals, specs
from services.engine.sampling_params import SamplingParams

SATURATED = 0.85  # a client process above this fraction of one core is the bottleneck
START_DELAY_S = 0.25  # from the parent's "go" to the common start: every client is waiting by then
PROTOCOLS = ("grpc", "openai")


class ClientError(RuntimeError):
    """A client process could not start (its warm-up request failed, or it died)."""


@dataclass(frozen=True)
class Level:
    """One load level: open loop at `rate` req/s or closed loop at `concurrency`, for `duration` s."""

    duration: float
    rate: float | None = None
    concurrency: int | None = None

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("a level has exactly one of rate (open loop) and concurrency (closed loop)")
        if self.duration <= 0 or (self.rate is not None and self.rate <= 0) or \
                (self.concurrency is not None and self.concurrency < 1):
            raise ValueError(f"duration, rate and concurrency must be > 0: {self}")

    @property
    def closed(self) -> bool:
        return self.concurrency is not None

    def label(self) -> str:
        return f"c={self.concurrency}" if self.closed else f"{self.rate:g}"


@dataclass(frozen=True)
class Target:
    """Where and how requests go. `url`: the router's HOST:PORT (grpc) or its http://HOST:PORT
    (openai); `model` names the served model in OpenAI bodies."""

    url: str
    protocol: str = "grpc"
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0, ignore_eos=True))
    request_timeout: float = 600.0
    model: str = ""
    api_key: str | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")


@dataclass(frozen=True)
class ClientUsage:
    """One client process's CPU time over its wall time of one level."""

    index: int
    cpu_s: float
    wall_s: float

    @property
    def fraction(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def saturated(self) -> bool:
        return self.fraction > SATURATED

    def to_json(self) -> dict:
        return {**asdict(self), "cpu_fraction": round(self.fraction, 4), "saturated": self.saturated}


@dataclass
class Outcome:
    """A level's requests from every client, the time from the common start to the last
    request's end, and each client's CPU use."""

    records: list[RequestRecord]
    elapsed_s: float
    usage: list[ClientUsage]


# --- one request, per protocol ----------------------------------------------------------------

class GrpcSender:
    """The router's Generate, server-streaming."""

    def __init__(self, target: Target) -> None:
        import grpc

        from pdserve.v1 import router_pb2_grpc
        from services.rpc.server import CHANNEL_OPTIONS

        self.target = target
        self._grpc = grpc
        self.channel = grpc.aio.insecure_channel(target.url, options=CHANNEL_OPTIONS)
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        self.metadata = (("authorization", f"Bearer {target.api_key}"),) if target.api_key else None

    async def one(self, spec: RequestSpec, at: float) -> RequestRecord:
        timer = StreamTimer(spec, at)
        try:
            call = self.stub.Generate(to_request(spec, self.target.sampling), timeout=self.target.request_timeout,
                                      metadata=self.metadata)
            async for response in call:
                timer.on_response(response)
        except self._grpc.aio.AioRpcError as e:
            return timer.fail(e.code().name)
        return timer.finish()

    async def close(self) -> None:
        await self.channel.close()


class OpenAISender:
    """/v1/completions with stream=true over one pooled HTTP client (the openai SDK's httpx).
    The SSE lines are read raw: the client parses only what it counts."""

    def __init__(self, target: Target) -> None:
        import openai

        self.target = target
        self.client = openai.DefaultAsyncHttpxClient(timeout=target.request_timeout)
        self.headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}

    def _body(self, spec: RequestSpec) -> dict:
        s = self.target.sampling
        prompt = list(spec.token_ids) if spec.token_ids is not None else spec.text
        return {"model": self.target.model, "prompt": prompt, "max_tokens": spec.max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, "temperature": s.temperature, "top_p": s.top_p,
                "ignore_eos": s.ignore_eos}

    async def one(self, spec: RequestSpec, at: float) -> RequestRecord:
        timer = StreamTimer(spec, at)
        record, last = timer.record, None
        try:
            async with self.client.stream("POST", f"{self.target.url}/v1/completions", json=self._body(spec),
                                          headers=self.headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    return timer.fail(f"HTTP_{response.status_code}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk, now = json.loads(line[6:]), time.perf_counter()
                    if chunk.get("choices"):
                        if last is None:
                            record.ttft_s = now - timer.start
                        else:
                            record.itl_s.append(now - last)
                        last = now
                    if chunk.get("usage"):
                        record.output_tokens = chunk["usage"]["completion_tokens"]
                        record.prompt_tokens = chunk["usage"]["prompt_tokens"]
        except Exception as e:  # noqa: BLE001 - any transport failure is this request's failure
            return timer.fail(type(e).__name__)
        if not record.output_tokens and record.ttft_s is not None:  # no usage chunk: one token a chunk
            record.output_tokens = len(record.itl_s) + 1
        return timer.finish()

    async def close(self) -> None:
        await self.client.aclose()


def make_sender(target: Target) -> GrpcSender | OpenAISender:
    return GrpcSender(target) if target.protocol == "grpc" else OpenAISender(target)


# --- one client's share of a level ------------------------------------------------------------

def share(items: Iterator, index: int, count: int) -> Iterator:
    """Items index, index + count, index + 2 * count, ... of `items`."""
    return itertools.islice(items, index, None, count)


def slots(concurrency: int, index: int, count: int) -> int:
    """Client `index`'s part of `concurrency` closed-loop slots (the first ones take the remainder)."""
    return concurrency // count + (1 if index < concurrency % count else 0)


def level_seeds(seed: int, level_index: int) -> tuple[str, str]:
    """The seeds of a level's requests and of its arrival times: each level its own prompts
    (none served from an earlier level's prefix cache) and the same ones for the same seed."""
    return f"rate:{seed}:{level_index}", f"arrivals:{seed}:{level_index}"


async def run_share(send: Callable, workload: Workload, level: Level, seeds: tuple[str, str], index: int,
                    count: int, start: float, on_done: Callable[[], None] = lambda: None
                    ) -> tuple[list[RequestRecord], float]:
    """Client `index` of `count`: its part of `level`, from monotonic time `start`. Requests of
    every client come from one stream (`level_seeds`), dealt round-robin, so N clients send the
    same requests as one. Returns its records and the monotonic time its last one ended."""
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    requests = share(specs(workload, seeds[0]), index, count)

    async def timed(spec: RequestSpec, at: float) -> RequestRecord:
        record = await send(spec, at)
        on_done()
        return record

    if not level.closed:
        arrivals = share(iter(poisson_arrivals(level.rate, level.duration, random.Random(seeds[1]))),
                         index, count)
        tasks = []
        for spec, at in zip(requests, arrivals):  # requests is endless; arrivals bound it
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            tasks.append(asyncio.create_task(timed(spec, at)))
        records = list(await asyncio.gather(*tasks))
        return records, time.monotonic()

    deadline = start + level.duration
    records = []

    async def slot() -> None:
        while (now := time.monotonic()) < deadline:
            records.append(await timed(next(requests), now - start))

    await asyncio.gather(*(slot() for _ in range(slots(level.concurrency, index, count))))
    return records, time.monotonic()


async def measured_share(send: Callable, workload: Workload, level: Level, seeds: tuple[str, str], index: int,
                         count: int, start: float, on_done: Callable[[], None] = lambda: None
                         ) -> tuple[list[RequestRecord], float, ClientUsage]:
    """`run_share` with this process's CPU time from `start` to the share's end."""
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    cpu = time.process_time()
    records, end = await run_share(send, workload, level, seeds, index, count, start, on_done)
    return records, end, ClientUsage(index, time.process_time() - cpu, end - start)


async def warm_up(send: Callable, workload: Workload, seed: int, warmup: int) -> None:
    for spec in itertools.islice(specs(workload, f"warmup:{seed}"), warmup):
        record = await send(spec, 0.0)
        if not record.ok:
            raise ClientError(f"warm-up request failed with {record.error}")


# --- client processes -------------------------------------------------------------------------

def _client_main(target: Target, workload: Workload, index: int, count: int, seed: int, warmup: int,
                 commands: mp.Queue, results: mp.Queue) -> None:
    """A client process: connect, warm up, say ready; then one share per command until None."""
    asyncio.run(_client_loop(target, workload, index, count, seed, warmup, commands, results))


async def _client_loop(target: Target, workload: Workload, index: int, count: int, seed: int, warmup: int,
                       commands: mp.Queue, results: mp.Queue) -> None:
    sender = make_sender(target)
    loop = asyncio.get_running_loop()
    try:
        try:
            await warm_up(sender.one, workload, seed, warmup)
        except ClientError as e:
            results.put(("error", index, str(e)))
            return
        results.put(("ready", index, None))
        while (command := await loop.run_in_executor(None, commands.get)) is not None:
            level, seeds, start = command
            records, end, usage = await measured_share(sender.one, workload, level, seeds, index, count, start)
            results.put(("done", index, {"records": [r.to_json() for r in records], "end": end,
                                         "usage": asdict(usage)}))
    finally:
        await sender.close()


class ClientPool:
    """`clients` client processes against one target, reused across levels."""

    def __init__(self, target: Target, workload: Workload, clients: int, seed: int = 0, warmup: int = 1,
                 start_timeout: float = 300.0) -> None:
        if clients < 1:
            raise ValueError(f"clients must be >= 1, got {clients}")
        self.target, self.workload, self.count = target, workload, clients
        self.seed, self.warmup, self.start_timeout = seed, warmup, start_timeout
        self._ctx = mp.get_context("spawn")
        self._results: mp.Queue = self._ctx.Queue()
        self._commands: list[mp.Queue] = []
        self._procs: list[mp.process.BaseProcess] = []

    def start(self) -> ClientPool:
        """Start every client; the first one sends the warm-up requests. Raises ClientError."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        for index in range(self.count):
            commands = self._ctx.Queue()
            proc = self._ctx.Process(target=_client_main, daemon=True, name=f"pdserve-bench-client-{index}",
                                     args=(self.target, self.workload, index, self.count, self.seed,
                                           self.warmup if index == 0 else 0, commands, self._results))
            proc.start()
            self._commands.append(commands)
            self._procs.append(proc)
        self._collect("ready", self.start_timeout)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def run(self, level: Level, seeds: tuple[str, str]) -> Outcome:
        """Every client's share of `level` from one common start; waits for all of them."""
        start = time.monotonic() + START_DELAY_S
        for commands in self._commands:
            commands.put((level, seeds, start))
        timeout = START_DELAY_S + level.duration + self.target.request_timeout + 60.0
        done = self._collect("done", timeout)
        records = [RequestRecord.from_json(r) for index in sorted(done) for r in done[index]["records"]]
        end = max(d["end"] for d in done.values())
        usage = [ClientUsage(**done[index]["usage"]) for index in sorted(done)]
        return Outcome(records, max(end - start, 1e-9), usage)

    def _collect(self, kind: str, timeout: float) -> dict[int, object]:
        got: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        while len(got) < self.count:
            try:
                what, index, payload = self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for p in self._procs if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    raise ClientError(f"client processes {dead or 'timed out'} before '{kind}'") from None
                continue
            if what == "error":
                raise ClientError(str(payload))
            got[index] = payload
        return got

    def close(self) -> None:
        for commands in self._commands:
            commands.put(None)
        for proc in self._procs:
            proc.join(10.0)
            if proc.is_alive():
                proc.kill()
                proc.join()

    def __enter__(self) -> ClientPool:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
