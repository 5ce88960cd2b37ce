"""The engine core in its own process (services/engine/core_client.py, core_process.py): the same
outputs as the in-thread engine, text and stop strings assembled in the front, every block back
in the child's pool after a cancel, a deadline or a stop string, remote-prefill ingest, and a
real SIGKILL of the child: every open stream ends with UNAVAILABLE and the worker goes
NOT_SERVING and exits."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.v1 import worker_pb2, worker_pb2_grpc
from services.cli.stack import Child, free_port
from services.engine import AsyncEngine, EngineConfig, SamplingParams
from services.engine.core_client import EngineProcess
from services.engine.engine import EngineCore
from services.engine.errors import ConfigError
from services.engine.outputs import SampledToken
from services.rpc.convert import params_to_proto

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parent.parent
# No prefix caching: one engine can then prefill a prompt for export and take the same prompt's
# KV in again as a remote prefill, without its own cache answering first.
CONFIG = EngineConfig(load_format="dummy", preset="tiny-llama", max_model_len=512, enable_prefix_caching=False,
                      kv_cache_memory=64 << 20)
PROMPTS = [list(range(10 + 7 * i, 50 + 7 * i)) for i in range(4)]
CASES = [
    SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=40, stop=("e", "th"), ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=40, stop=("an",), include_stop_str_in_output=True, min_tokens=3,
                   ignore_eos=True, logprobs=2),
    SamplingParams(temperature=0.8, seed=7, n=3, max_tokens=24, stop=("o",), ignore_eos=True),
]


@pytest.fixture(scope="module")
def engines():
    process, thread = EngineProcess(CONFIG), AsyncEngine(core=EngineCore(CONFIG))
    yield process, thread
    process.shutdown()
    thread.shutdown()


async def collect(engine, prompt, params, **kw) -> list[tuple]:
    """Every sequence's (tokens, text, finish reason, stop reason, logprobs) as streamed."""
    seqs: dict[int, list] = {}
    async for out in engine.generate(prompt, params, **kw):
        for c in out.outputs:
            s = seqs.setdefault(c.index, [[], "", None, None, []])
            s[0] += c.token_ids
            s[1] += c.text
            s[2], s[3] = c.finish_reason, c.stop_reason
            s[4] += [sorted(p) for p in c.logprobs or []]
    return [tuple(seqs[i]) for i in sorted(seqs)]


async def wait_pool_full(engine: EngineProcess, timeout: float = 30) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats["free_kv_blocks"] == stats["total_kv_blocks"] and stats["requests"] == 0:
            return stats
        await asyncio.sleep(0.05)
    raise AssertionError(f"the core's pool is not full again: {engine.stats()}")


def test_outputs_are_identical_with_the_core_in_its_process_and_in_a_thread(engines):
    process, thread = engines

    async def main():
        results = []
        for engine in engines:
            runs = [collect(engine, p, params) for params in CASES for p in PROMPTS]
            results.append(await asyncio.gather(*runs))
        await wait_pool_full(process)
        return results

    on, off = asyncio.run(main())
    assert on == off
    reasons = {s[3] for run in on for s in run}
    assert {"e", "th", "an", "o"} & reasons, reasons  # stop strings did end some sequences
    assert any(s[1].endswith("an") for run in on for s in run)  # include_stop_str_in_output


def test_cancel_deadline_and_a_stop_string_give_every_block_back_read_through_the_client(engines):
    process, _ = engines
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def main():
        async def cancelled():
            async for _ in process.generate(PROMPTS[0], long):
                break  # the caller leaves: the front aborts it in the core

        async def deadline():
            async def run():
                async for _ in process.generate(PROMPTS[1], long):
                    pass
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(run(), 0.5)

        stopped = collect(process, PROMPTS[2], SamplingParams(temperature=0, max_tokens=400, stop=("e",),
                                                               ignore_eos=True))
        _, _, [(tokens, text, reason, stop, _)] = await asyncio.gather(cancelled(), deadline(), stopped)
        await wait_pool_full(process)  # the front's stop told the core to free the stopped request
        return tokens, reason, stop

    tokens, reason, stop = asyncio.run(main())
    assert (reason, stop) == ("stop", "e") and len(tokens) < 400


def test_a_remote_prefill_completes_with_the_core_in_its_process(engines):
    process, thread = engines
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = list(range(100, 150))  # three full blocks and a partial one

    async def main():
        blocks, first = [], []
        async for out in process.generate(prompt, params, kv_export_from=0):
            blocks += out.kv_blocks
            first += [c.token_ids[0] for c in out.outputs if c.token_ids]
        tokens, imp = [], None
        async for out in process.generate(prompt, params, remote_prefill=True, request_id="remote"):
            if out.kv_pull_from_block is not None:
                for block in blocks[out.kv_pull_from_block:]:
                    process.put_kv("remote", block)
                process.finish_kv("remote", [SampledToken(first[0], None)], 0)
            for c in out.outputs:
                tokens += c.token_ids
            imp = out.kv_import or imp
        expected = await collect(thread, prompt, params)
        await wait_pool_full(process)
        return len(blocks), tokens, imp, expected[0][0]

    num_blocks, tokens, imp, expected = asyncio.run(main())
    assert num_blocks == 4
    assert imp.state == "done" and imp.computed_locally == 0 and imp.completed_at >= imp.allocated_at
    assert tokens == expected


# ---- a real worker, its core killed --------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_the_engine_core_ends_every_stream_unavailable_and_the_worker_not_serving(tmp_path):
    port = free_port()
    child = Child("decode", f"decode-k{port}", f"127.0.0.1:{port}", 0,
                  [sys.executable, "-m", "services.cli.main", "decode", "--port", str(port), "--metrics-port", "0",
                   "--instance-id", f"decode-k{port}", "--load-format", "dummy", "--preset", "tiny-llama",
                   "--max-model-len", "512", "--kv-cache-memory", "64MiB"], tmp_path / "decode.log")
    child.start({**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "protos")])})
    try:
        with grpc.insecure_channel(child.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 180
            while True:
                assert child.alive() and time.monotonic() < deadline, child.log_tail()
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        break
                except grpc.RpcError:
                    time.sleep(0.2)
            [core] = _children(child.proc.pid)
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=120)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            stub = worker_pb2_grpc.DecodeWorkerStub(channel)
            long = params_to_proto(SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
            calls = [stub.Generate(worker_pb2.DecodeRequest(request_id=f"k{i}", prompt_token_ids=PROMPTS[i],
                                                            sampling=long), timeout=120) for i in range(4)]
            for call in calls:
                next(call)  # every stream is in flight
            os.kill(core, signal.SIGKILL)
            codes = []
            for call in calls:
                try:
                    for _ in call:
                        pass
                    codes.append("OK")
                except grpc.RpcError as e:
                    codes.append(e.code().name)
            assert codes == ["UNAVAILABLE"] * 4, codes
            statuses = []
            try:
                for update in watch:
                    statuses.append(update.status)
            except grpc.RpcError:
                pass  # the server stopped after saying so
            assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses, statuses
        assert child.proc.wait(60) == 1
        assert "the engine stopped" in child.log_tail()
    finally:
        if child.alive():
            child.proc.kill()
            child.proc.wait()


def test_a_core_that_cannot_start_is_a_config_error_in_the_front():
    with pytest.raises(ConfigError, match="exited .* before it was ready"):
        EngineProcess(EngineConfig(load_format="dummy", preset="tiny-llama", max_model_len=512, num_kv_blocks=1))


def test_prompt_logprobs_phase_times_and_step_counts_cross_the_process_as_in_a_thread(engines):
    """What the step message carries besides tokens: a prompt_logprobs request's scores (the
    same as the in-thread engine's), a finished request's phase times (for the request
    histograms) and each step's token count (iteration_tokens_total)."""
    process, thread = engines
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, prompt_logprobs=2)

    async def run(engine):
        engine.drain_step_tokens()
        prompt_logprobs, times = None, None
        async for out in engine.generate(PROMPTS[3], params):
            prompt_logprobs = out.prompt_logprobs if out.prompt_logprobs is not None else prompt_logprobs
            times = out.times or times
        if engine is process:
            await wait_pool_full(process)
        return prompt_logprobs, times, engine.drain_step_tokens()

    (on_lp, on_times, on_steps), (off_lp, _, off_steps) = asyncio.run(run(process)), asyncio.run(run(thread))
    assert on_lp is not None and len(on_lp) == len(PROMPTS[3]) and on_lp[0] is None
    assert [sorted(p) for p in on_lp[1:]] == [sorted(p) for p in off_lp[1:]]
    assert all(abs(on_lp[i][t].logprob - off_lp[i][t].logprob) < 1e-5 for i in range(1, len(on_lp)) for t in on_lp[i])
    arrival, scheduled, first_token = on_times
    assert arrival <= scheduled <= first_token
    assert sum(on_steps) == sum(off_steps) == len(PROMPTS[3]) + 4  # the prompt, then 4 decode steps


def test_speculative_decoding_runs_in_the_core_process_and_its_totals_reach_the_front():
    """--speculative-config crosses into the child (as JSON) and its totals come back: with the
    target as its own draft, greedy, every draft is accepted, as in the thread."""
    from services.engine.spec.config import SpeculativeConfig

    spec = SpeculativeConfig.parse({"method": "draft_model", "num_speculative_tokens": 3, "load_format": "dummy",
                                    "preset": "tiny-llama"})
    config = EngineConfig(load_format="dummy", preset="tiny-llama", max_model_len=256, speculative_config=spec,
                          kv_cache_memory=64 << 20)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    async def run(engine):
        result = await collect(engine, PROMPTS[0], params)
        deadline = time.monotonic() + 30
        while engine.spec_stats().num_drafts == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the totals travel with the core's next message
        return result, engine.spec_stats()

    process = EngineProcess(config)
    try:
        on, stats = asyncio.run(run(process))
    finally:
        process.shutdown()
    thread = AsyncEngine(core=EngineCore(config))
    try:
        off, _ = asyncio.run(run(thread))
    finally:
        thread.shutdown()
    assert on == off
    assert stats.num_drafts > 0 and stats.num_accepted_tokens == stats.num_draft_tokens > 0
