"""How the CPU engine's OpenMP threads wait for each other: spin briefly, then sleep.

torch runs a CPU operation on its intra-op threads (libgomp in the Linux wheels), and every
operation ends at a barrier. A thread that reaches the barrier first spins there before it
sleeps: by libgomp's default for 300,000 iterations, about a millisecond. A decode step is
hundreds of small operations, so when the cores are shared (another process, or the router
and a client beside the workers of `pdserve serve` on a laptop) the spinning thread holds
the core its sibling needs to finish, and a barrier can cost a scheduler time slice. On the
2-core development machine, the default model, 16 requests x 64 tokens, 2 threads
(2026-12-05, loadtest/bench_offline_vs_hf.py --busy-neighbour has the full table):

    spin limit          alone    beside a 2-thread matmul loop
    300,000 (default)   7.1 s    27.8 s
    10,000              7.7 s    17.9 s
    0 (PASSIVE)         9.4 s    14.9 s

libgomp reads its environment once, when torch loads it, so this runs before `import torch`:
from the `pdserve` command and from `services.engine`'s package import. A wait policy the user
set (GOMP_SPINCOUNT or OMP_WAIT_POLICY) is left alone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

SPIN_COUNT = "10000"


def prefer_short_spins(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Cap libgomp's spin-wait unless the user chose a wait policy or torch is already loaded
    (then it is too late); True when the cap was set. Child processes inherit it."""
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in environ or "OMP_WAIT_POLICY" in environ:
        return False
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True
