"""cProfile for the processes of a stack that `loadtest/profile_serve.py --profile DIR` starts
(never imported by the product). That script puts this directory on the children's PYTHONPATH
and names a directory in $PDSERVE_CPROFILE_DIR; every pdserve router, decode or prefill process
then profiles its main thread (the router's event loop, a worker's gRPC front; not the engine's
step thread) from its first SIGUSR1 (sent once the load is warm, so start-up stays out) and
writes DIR/<role>-<pid>.prof when it exits (SIGTERM drains, then exits normally). The timer is
the thread's CPU clock: a function's time is CPU its thread spent, never time spent waiting.
"""

from __future__ import annotations

import atexit
import cProfile
import os
import signal
import sys
import time


def _role() -> str | None:
    for role in ("router", "decode", "prefill"):
        if role in sys.argv:
            return role
    return None


def _install(out_dir: str, role: str) -> None:
    profile = cProfile.Profile(time.thread_time)
    started = False

    def start(*_) -> None:
        nonlocal started
        if not started:
            started = True
            profile.enable()

    def dump() -> None:
        if started:
            profile.disable()
            profile.dump_stats(os.path.join(out_dir, f"{role}-{os.getpid()}.prof"))

    signal.signal(signal.SIGUSR1, start)
    atexit.register(dump)


if (_dir := os.environ.get("PDSERVE_CPROFILE_DIR")) and (_r := _role()):
    _install(_dir, _r)
