"""Test-only fault injection for the decode workers of tests/test_faults_migration.py, loaded
through their PYTHONPATH (the product carries no such switch).

A request whose prompt starts with POISON breaks the stream of every decode worker it reaches,
as a worker crashing under it would (UNAVAILABLE), while the worker's other requests go on.
It also installs tests/engine_faults (an engine step that raises, when the test asks).
"""

from __future__ import annotations

from services.decode import server
from services.engine.errors import UnavailableError
from tests.faults.poison import POISON

_responses = server.DecodeServicer.responses  # behind both Generate and GenerateStream


async def _poisoned(self, request, *args):
    if list(request.prompt_token_ids[: len(POISON)]) == POISON:
        raise UnavailableError("poisoned: the worker crashed under this request")
    async for response in _responses(self, request, *args):
        yield response


server.DecodeServicer.responses = _poisoned

# The engine faults of tests/test_faults.py too (a step that raises, on request through $PDSERVE_FAULT_DIR).
from tests.engine_faults import sitecustomize as _engine_faults  # noqa: E402,F401
