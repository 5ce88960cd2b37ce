"""`pdserve router --router-workers N`: N router processes behind one gRPC port and one HTTP port.

    pdserve router --router-workers 2    the parent: binds no server, holds the ports, supervises
      |-- router worker 0  gRPC :50051  HTTP :8000  health :50052   each a whole router (main.py):
      `-- router worker 1  gRPC :50051  HTTP :8000  health :50052   its own event loop, tokenizer
                                                                     threads, registry, Redis pool

Every worker listens on the same ports with SO_REUSEPORT, so clients keep one address and the
kernel spreads their *connections* over the workers (by a hash of the client's address and
port). One gRPC channel or one keep-alive HTTP connection therefore stays with one worker: the
gain needs many client connections, as with vLLM's `--api-server-count`.

What each worker has on its own: the requests in flight that the routing policy adds to each
instance's polled load, the recent routes it counts as cached, the registry and its GetLoad
polls, tokenizer threads, Redis connections. The polled load (every 0.5 s) is what all of
them share; between polls each sees only its own routes, as N router replicas would.

Metrics: prometheus_client's multiprocess mode, as vLLM does with several API servers. The
parent makes PROMETHEUS_MULTIPROC_DIR (or uses the one it was given); /metrics on any worker is
the whole router: counters and histograms summed over the workers (the dead ones' too: a
counter never goes back), gauges by their mode (router/metrics.py), and
pdserve:router_process_requests once per live worker (label pid) to show the spread.

Supervision: a worker that exits is started again after RestartPolicy's backoff (the others
keep serving meanwhile); a crash loop stops the group, exit 1, and so does a worker whose
first start ends before it served (a bad flag or file fails every worker alike). SIGTERM or SIGINT to the parent
goes to every worker, and each drains as a single router does (health NOT_SERVING, gRPC and HTTP
stop accepting, --grace for the requests in flight). A worker whose parent is gone drains too.
The health port is shared like the others: a probe gets whichever worker the kernel picks.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from services.cli.stack import CrashLoop, RestartPolicy

log = logging.getLogger("pdserve.router")

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it when it is imported
STOP_MARGIN_S = 10.0  # beyond --grace: a worker's gRPC stop and HTTP shutdown after its drain


@dataclass(frozen=True)
class WorkerSlot:
    """Which worker of a group a router process is (run_router without one: the only router).
    `serving`: a multiprocessing Event the worker sets once it listens."""

    index: int
    count: int
    parent_pid: int
    serving: Any = field(default=None, compare=False)

    def mark_serving(self) -> None:
        if self.serving is not None:
            self.serving.set()


class StartupFailed(CrashLoop):
    """A worker's first start ended before it served (a bad flag, file or model): as a single
    router would, the group exits at once, with no restarts that would fail the same way."""


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, not yet listening.

    The parent holds one per port: it gives port 0 a number and keeps the port ours while
    workers restart, and takes no connections (the kernel hands them only to listening
    sockets). A worker passes its own to uvicorn, which listens on it."""
    family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


async def watch_parent(parent_pid: int, period_s: float = 1.0) -> None:
    """Drain (SIGTERM to ourselves) once the parent is gone, e.g. killed: an orphaned worker
    must not keep a share of the router's port."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(period_s)
    log.warning("the router's parent process (pid %d) is gone; draining", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class _Worker:
    slot: WorkerSlot
    process: multiprocessing.Process | None = None
    restarts: list[float] = field(default_factory=list)  # monotonic times, as RestartPolicy counts them
    restart_at: float | None = None
    reaped: bool = False  # its live gauges are gone from the metrics directory

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()


class RouterGroup:
    """The parent: starts `count` router workers with `args` (ports already concrete), restarts
    those that exit, forwards SIGTERM/SIGINT, and stops them all at the end."""

    def __init__(self, args: argparse.Namespace, count: int, policy: RestartPolicy = RestartPolicy()) -> None:
        self.args = args
        self.policy = policy
        self.context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked grpc or threads
        self.workers = [_Worker(WorkerSlot(i, count, os.getpid())) for i in range(count)]

    def run(self, stop: threading.Event) -> int:
        """Supervise until `stop` is set (0) or a crash loop (1); then stop every worker."""
        for worker in self.workers:
            self._start(worker)
        try:
            while not stop.is_set():
                sentinels = [w.process.sentinel for w in self.workers if w.alive()]
                if sentinels:
                    multiprocessing.connection.wait(sentinels, timeout=0.2)
                else:  # every worker is waiting for its restart
                    stop.wait(0.2)
                for worker in self.workers:
                    if not stop.is_set():
                        self._supervise(worker)
            return 0
        except CrashLoop as e:
            print(f"pdserve router: {e}; stopping", file=sys.stderr, flush=True)
            return 1
        finally:
            self.stop(self.args.grace + STOP_MARGIN_S)

    def _start(self, worker: _Worker) -> None:
        worker.slot = replace(worker.slot, serving=self.context.Event())
        worker.process = self.context.Process(target=_worker_main, args=(self.args, worker.slot),
                                              name=f"router-{worker.slot.index}")
        worker.process.start()
        worker.reaped = False

    def _supervise(self, worker: _Worker) -> None:
        if worker.alive():
            return
        self._reap(worker)
        now = time.monotonic()
        if worker.restart_at is None:
            recent = self.policy.recent(worker.restarts, now)
            name = f"router worker {worker.slot.index} (pid {worker.process.pid})"
            if not worker.restarts and not worker.slot.serving.is_set():
                raise StartupFailed(f"{name} exited ({worker.process.exitcode}) before it served")
            if recent + 1 >= self.policy.crash_loop_restarts:
                raise CrashLoop(f"{name} exited ({worker.process.exitcode}) after {recent} restarts "
                                f"within {self.policy.crash_loop_window_s:.0f}s")
            worker.restart_at = now + self.policy.backoff(recent)
            print(f"pdserve router: {name} exited ({worker.process.exitcode}); restarting in "
                  f"{worker.restart_at - now:.1f}s", file=sys.stderr, flush=True)
        elif now >= worker.restart_at:
            worker.restart_at = None
            worker.restarts.append(now)
            self._start(worker)
            print(f"pdserve router: restarted router worker {worker.slot.index} (pid {worker.process.pid})",
                  file=sys.stderr, flush=True)

    def _reap(self, worker: _Worker) -> None:
        """Drop a dead worker's live gauges (its counters stay in the sums)."""
        if worker.process is not None and not worker.reaped:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.process.pid)
            worker.reaped = True

    def stop(self, timeout: float) -> None:
        """SIGTERM to every worker (each drains), SIGKILL to those still there after `timeout`."""
        for worker in self.workers:
            if worker.alive():
                worker.process.terminate()
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            if worker.process is None:
                continue
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            self._reap(worker)


def run_router_workers(args: argparse.Namespace) -> int:
    """`pdserve router --router-workers N` (N > 1): the parent process, until SIGTERM/SIGINT."""
    held = _hold_ports(args)
    ports = {name: sock.getsockname()[1] for name, sock in held.items()}
    own_dir = not os.environ.get(MULTIPROC_DIR)
    if own_dir:  # the workers inherit it
        os.environ[MULTIPROC_DIR] = tempfile.mkdtemp(prefix="pdserve-router-metrics-")
    else:  # an operator's (e.g. a volume): an earlier run's values must not add to ours
        for stale in Path(os.environ[MULTIPROC_DIR]).glob("*.db"):
            stale.unlink()
    worker_args = worker_namespace(args, ports)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"pdserve router: {args.router_workers} router workers on {args.host}:{ports['port']} (gRPC) and "
          f":{ports['http_port']} (HTTP), metrics summed over them", flush=True)
    try:
        return RouterGroup(worker_args, args.router_workers).run(stop)
    finally:
        for sock in held.values():
            sock.close()
        if own_dir:
            shutil.rmtree(os.environ[MULTIPROC_DIR], ignore_errors=True)


def worker_namespace(args: argparse.Namespace, ports: dict[str, int]) -> argparse.Namespace:
    """A worker's arguments: the parent's, every security flag included, with the ports made
    concrete (port 0 picked once, for all) and nothing that cannot travel to a spawned process."""
    return argparse.Namespace(**{**{k: v for k, v in vars(args).items() if k != "run"}, **ports})


def _hold_ports(args: argparse.Namespace) -> dict[str, socket.socket]:
    """One reserving socket per port the workers share (argument name -> socket)."""
    held: dict[str, socket.socket] = {}
    try:
        for name in ("port", "http_port", "health_port"):
            port = getattr(args, name)
            if name != "health_port" or port:  # --health-port 0 is off, not "any port"
                held[name] = reuse_port_socket(args.host, port)
    except OSError as e:
        for sock in held.values():
            sock.close()
        raise SystemExit(f"pdserve router: cannot bind {args.host}:{getattr(args, name)} ({e}): "
                         "is another process listening there?") from e
    return held


def _worker_main(args: argparse.Namespace, slot: WorkerSlot) -> None:
    """A spawned worker's entry point: one whole router."""
    from services.cli.serve import run_router_process

    # Ctrl-C reaches the whole process group: the parent turns it into SIGTERM for each worker,
    # so a worker still starting up stops without a KeyboardInterrupt traceback (the drain
    # installs its own SIGINT handler once serving).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(run_router_process(args, slot))
