"""An engine step that raises (issue #25): every in-flight stream fails at once with
EngineFailedError (INTERNAL: the router may move it), `death()` resolves so the worker goes
NOT_SERVING and exits, and new requests fail fast with EngineDeadError (UNAVAILABLE). The fault
is a monkeypatched step."""

from __future__ import annotations

import asyncio

import pytest

from services.engine import AsyncEngine, SamplingParams
from services.engine.errors import EngineDeadError, EngineFailedError
from tests.conftest import make_llm

PARAMS = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


def test_a_raising_step_fails_every_stream_resolves_death_and_refuses_new_requests(monkeypatch):
    llm = make_llm("tiny-llama")
    core = llm.engine
    real_step = core.step
    steps = 0

    def step():
        nonlocal steps
        steps += 1
        if steps == 20:
            raise RuntimeError("injected: the device fell over")
        return real_step()

    monkeypatch.setattr(core, "step", step)

    async def main() -> tuple[list[str], BaseException, float]:
        engine = AsyncEngine(core=core)
        death = engine.death()
        started = asyncio.Event()

        async def one(i: int) -> str:
            try:
                async for _ in engine.generate(list(range(10 + i, 30 + i)), PARAMS):
                    started.set()
            except (EngineDeadError, EngineFailedError) as e:
                return type(e).__name__
            return "finished"

        outcomes = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8))), 60)
        cause = await asyncio.wait_for(death, 5)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate([1, 2, 3], PARAMS):
                pass
        return outcomes, cause, loop.time() - t0

    outcomes, cause, refused_after = asyncio.run(main())
    assert outcomes == ["EngineFailedError"] * 8  # their own failure: INTERNAL (the router may migrate them)
    assert isinstance(cause, RuntimeError) and "injected" in str(cause)
    assert EngineFailedError.grpc_status == "INTERNAL" and EngineDeadError.grpc_status == "UNAVAILABLE"
    print(f"\nnew request refused in {refused_after * 1000:.1f} ms")
