"""cProfile for the processes of a stack that `loadtest/profile_serve.py --profile DIR` starts
(never imported by the product). That script puts this directory on the children's PYTHONPATH
and names a directory in $PDSERVE_CPROFILE_DIR; every pdserve process then profiles its main
thread (the router's event loop, a worker's gRPC front; not the engine's step thread) from
start-up and writes DIR/<role>-<pid>.prof when it exits (SIGTERM drains, then exits normally).
"""

from __future__ import annotations

import atexit
import cProfile
import os
import sys


def _role() -> str | None:
    for role in ("router", "decode", "prefill"):
        if role in sys.argv:
            return role
    return None


def _install(out_dir: str, role: str) -> None:
    profile = cProfile.Profile()

    def dump() -> None:
        profile.disable()
        profile.dump_stats(os.path.join(out_dir, f"{role}-{os.getpid()}.prof"))

    atexit.register(dump)
    profile.enable()


if (_dir := os.environ.get("PDSERVE_CPROFILE_DIR")) and (_r := _role()):
    _install(_dir, _r)
