"""Test-only engine faults for the worker processes tests/test_faults.py spawns (never imported
by the product; tests/faults/ holds the router-migration suite's own hook).

The test puts this directory on the children's PYTHONPATH and names a directory in
$PDSERVE_FAULT_DIR; this module then patches a decode or prefill worker's engine at start-up:

    step-raises.<instance-id>   the worker's next engine step raises (once: claimed by a rename)
    step-sleep.<instance-id>    every step first sleeps this many seconds (a slow CPU)
    trace.<instance-id>         written here: one JSON line per step (the request ids it computes,
                                its tokens) and one per abort the engine handled
"""

from __future__ import annotations

import json
import os
import sys
import time


def _instance_id() -> str | None:
    argv = sys.argv
    if not any(role in argv for role in ("decode", "prefill")) or "--instance-id" not in argv:
        return None
    return argv[argv.index("--instance-id") + 1]


def _install(fault_dir: str, instance_id: str) -> None:
    from services.engine.engine import EngineCore
    from services.engine.scheduler import Scheduler

    raises = os.path.join(fault_dir, f"step-raises.{instance_id}")
    sleep = os.path.join(fault_dir, f"step-sleep.{instance_id}")
    trace = open(os.path.join(fault_dir, f"trace.{instance_id}"), "a", buffering=1)  # noqa: SIM115
    owners: dict[int, str] = {}  # seq id -> request id
    schedule, step, add, abort = Scheduler.schedule, EngineCore.step, EngineCore.add, EngineCore.abort

    def traced_schedule(self):
        plan = schedule(self)
        if plan.seqs:
            ids = sorted({owners.get(s.seq_id, "?") for s in plan.seqs})
            trace.write(json.dumps({"t": time.time(), "step": ids, "tokens": plan.num_tokens}) + "\n")
        return plan

    def faulty_step(self):
        try:
            os.rename(raises, raises + ".fired")
        except FileNotFoundError:
            pass
        else:
            raise RuntimeError("injected fault: the engine step raised")
        if os.path.exists(sleep):
            time.sleep(float(open(sleep).read() or 0))
        return step(self)

    def traced_add(self, request):
        add(self, request)
        first = request.seqs[0].seq_id
        owners.update({first + i: request.request_id for i in range(request.params.n)})

    def traced_abort(self, request_id):
        request = abort(self, request_id)
        if request is not None:
            trace.write(json.dumps({"t": time.time(), "abort": request_id}) + "\n")
        return request

    Scheduler.schedule, EngineCore.step, EngineCore.add, EngineCore.abort = \
        traced_schedule, faulty_step, traced_add, traced_abort


_dir, _id = os.environ.get("PDSERVE_FAULT_DIR"), _instance_id()
if _dir and _id:
    _install(_dir, _id)
