"""A whole pdserve deployment as local processes: N prefill + N decode workers and a router,
joined through a fleet registry in Redis.

`pdserve serve` runs one for a user; the end-to-end tests start one per session. Workers get
free loopback ports; each process is a real `pdserve` command talking gRPC over sockets.
Without a Redis URL the stack starts a private redis-server (services/fleet/redis_server.py),
so the local stack runs the same code path as a cluster: workers register and publish their
prefix caches, the router and decode workers find each other through the registry.
A placement function (services/cli/placement.py) gives each worker its own environment and
engine flags: its GPU (CUDA_VISIBLE_DEVICES), its threads, its share of a GPU's memory.
Shutdown is ordered: the router first (no new requests), then decode, then prefill workers,
then the private Redis. With `--router-workers N` the router child is the parent of N router
processes on the same ports (router/workers.py): it supervises them itself, and the stack sees
one router.

While it runs, the stack supervises its children (`supervise`, RestartPolicy): one that exits
is started again, with the same argv and environment (its certificate, ports and secrets),
after a backoff that doubles with each recent restart; meanwhile the router routes around a
missing worker (its registry record expires, its GetLoad polls fail). A child restarted
`crash_loop_restarts` times within `crash_loop_window_s` is in a crash loop: the stack stops.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli.placement import Placement, PlacementFn, gpu_per_worker
from services.fleet import schema
from services.fleet.redis_server import RedisServer
from services.rpc.security import TLSFiles, internal_sync_channel, make_internal_certs, read_key_file


_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now and never handed out before by this process: the kernel may offer a
    closed probe's port again, and two children given one port would collide (a router refuses
    a gRPC port another process listens on)."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@dataclass
class Child:
    role: str
    instance_id: str
    address: str
    metrics_port: int
    argv: list[str]
    log_path: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)  # over the stack's env (its placement)
    health_address: str = ""  # plaintext grpc.health.v1 (--health-port): how the stack checks it
    proc: subprocess.Popen | None = field(default=None, repr=False)
    restarts: list[float] = field(default_factory=list, repr=False)  # monotonic times of restarts
    restart_at: float | None = field(default=None, repr=False)  # when a pending restart is due

    def start(self, env: dict[str, str] | None) -> None:
        if self.extra_env:
            env = {**(os.environ if env is None else env), **self.extra_env}
        out = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT if out else None, env=env)

    def channel(self) -> grpc.Channel:
        """A blocking channel to this worker, presenting the worker's own internal certificate
        (an operator's or a test's view; clients go through the router)."""
        tls = None
        if "--internal-tls" in self.argv:
            tls = TLSFiles.internal(self.argv[self.argv.index("--internal-tls") + 1])
        return internal_sync_channel(self.address, tls)

    def health_channel(self) -> grpc.Channel:
        """Its plaintext health port if it has one, else its main port."""
        return grpc.insecure_channel(self.health_address) if self.health_address else self.channel()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_serving(self, timeout: float, poll: float = 0.2) -> None:
        """Until its health service answers SERVING; RuntimeError if it exits first,
        TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.instance_id} exited:\n{self.log_tail()}")
            with self.health_channel() as ch:
                try:
                    reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
            time.sleep(poll)
        raise TimeoutError(self.log_tail())

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path and self.log_path.exists():
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


@dataclass(frozen=True)
class RestartPolicy:
    """How `LocalStack.supervise` restarts a child that exited: after `backoff_s`, doubled for
    each restart of that child within the window (at most `max_backoff_s`). The
    `crash_loop_restarts`-th restart within `crash_loop_window_s` is not made: a crash loop."""

    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    crash_loop_restarts: int = 5
    crash_loop_window_s: float = 120.0

    def recent(self, restarts: list[float], now: float) -> int:
        """How many of `restarts` (monotonic times) fall within the crash-loop window."""
        return sum(1 for t in restarts if now - t < self.crash_loop_window_s)

    def backoff(self, recent: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** recent)


class CrashLoop(RuntimeError):
    """A child kept exiting: the stack gives up (exit 1) rather than restart it forever."""


class LocalStack:
    def __init__(
        self,
        model_argv: list[str],
        num_prefill: int = 1,
        num_decode: int = 1,
        host: str = "127.0.0.1",
        router_port: int = 0,
        http_port: int = 0,
        router_argv: list[str] = (),
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        decode_argv: list[str] = (),
        log_level: str = "WARNING",
        redis_url: str | None = None,
        placement: PlacementFn | None = None,
        sequential_start: bool = False,
        worker_argv: list[str] = (),
        api_keys: list[str] = (),
        prefill_argv: list[str] = (),
    ) -> None:
        """Without `redis_url` the stack runs its own redis-server on a free port, with a fresh
        password. `placement` gives each worker extra environment and engine flags; with
        `sequential_start` workers start one at a time, each once the one before answers health
        checks (GPU workers that share a device must: each sizes its KV pool from the memory the
        others left). `api_keys`: what the router's clients must present (none: open).

        Every process gets its own internal certificate (security.py), so workers answer only
        their peers, and a plaintext health port; secrets reach the children through files and
        the environment, never a command line."""
        self.host = host
        self.env = env
        self.sequential_start = sequential_start
        self.secrets = Path(tempfile.mkdtemp(prefix="pdserve-stack-"))  # 0700: ours alone
        self.redis = None if redis_url else RedisServer(free_port(host), host, log_dir / "redis.log" if log_dir else None,
                                                        password=secrets.token_urlsafe(24))
        self.redis_url = redis_url or self.redis.url
        names = [*(f"prefill-{i}" for i in range(num_prefill)), *(f"decode-{i}" for i in range(num_decode)), "router"]
        self.certs = make_internal_certs(self.secrets / "internal-tls", names)
        secret_env = {"PDSERVE_REDIS_URL": self.redis_url}
        fleet = ["--advertise-host", host]
        cli = [sys.executable, "-m", "services.cli.main", "--log-level", log_level]

        def child(role: str, index: int, port: int, extra: list[str]) -> Child:
            instance_id = f"{role}-{index}"
            metrics_port, health_port = free_port(host), free_port(host)
            place = placement(role, index) if placement else Placement()
            argv = [*cli, role, "--host", host, "--port", str(port), "--instance-id", instance_id,
                    "--metrics-port", str(metrics_port), "--health-port", str(health_port),
                    "--internal-tls", str(self.certs[instance_id]), *extra, *model_argv, *place.argv]
            log_path = log_dir / f"{instance_id}.log" if log_dir else None
            return Child(role, instance_id, f"{host}:{port}", metrics_port, argv, log_path, {**secret_env, **place.env},
                         f"{host}:{health_port}")

        self.prefills = [child("prefill", i, free_port(host), [*fleet, *worker_argv, *prefill_argv])
                         for i in range(num_prefill)]
        # No prefill worker here, no pool to map over CUDA IPC: a decode worker on a GPU may then run
        # its engine core in its own process (serve.py _engine). Flags given later still win.
        no_ipc = ["--kv-transport", "grpc"] if num_prefill == 0 else []
        self.decodes = [child("decode", i, free_port(host), [*fleet, *worker_argv, *no_ipc, *decode_argv])
                        for i in range(num_decode)]
        router_port = router_port or free_port(host)
        self.http_port = http_port or free_port(host)
        health_port = free_port(host)
        key_argv: list[str] = []
        if api_keys:
            key_file = self.secrets / "api-keys"
            key_file.touch(mode=0o600)
            key_file.write_text("".join(f"{k}\n" for k in api_keys))
            key_argv = ["--api-key-file", str(key_file)]
        argv = [*cli, "router", "--host", host, "--port", str(router_port), "--http-port", str(self.http_port),
                "--health-port", str(health_port), "--internal-tls", str(self.certs["router"]), *key_argv,
                *router_argv, *model_argv]
        log_path = log_dir / "router.log" if log_dir else None
        self.router = Child("router", "router", f"{host}:{router_port}", self.http_port, argv, log_path,
                            dict(secret_env), f"{host}:{health_port}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LocalStack:
        from services.cli.model_args import model_argv
        from services.cli.serve import router_argv, worker_argv

        placement = (gpu_per_worker(args.gpus, args.prefill, args.decode,
                                    args.tensor_parallel_size * args.pipeline_parallel_size)
                     if args.gpus else None)
        keys = [*args.api_key, *(read_key_file(args.api_key_file) if args.api_key_file else [])]
        # $PDSERVE_API_KEY reaches the router through the environment it inherits.
        return cls(model_argv(args), args.prefill, args.decode, args.host, args.port, args.http_port,
                   router_argv(args), log_level=args.log_level, redis_url=args.redis, placement=placement,
                   prefill_argv=["--kv-layerwise", args.kv_layerwise],
                   decode_argv=["--kv-pull-timeout", str(args.kv_pull_timeout),
                                "--kv-progress-timeout", str(args.kv_progress_timeout),
                                "--stream-interval", str(args.stream_interval)],
                   worker_argv=worker_argv(args), api_keys=keys)

    @property
    def router_address(self) -> str:
        return self.router.address

    @property
    def children(self) -> list[Child]:
        return [*self.prefills, *self.decodes, self.router]

    def start(self, timeout: float = 600.0) -> LocalStack:
        """Workers first (they load the model), then the router once they answer health checks
        and are registered (so it routes to all of them from its first request)."""
        if self.redis is not None:
            self.redis.start()
        workers = [*self.prefills, *self.decodes]
        for c in workers:
            c.start(self.env)
            if self.sequential_start:
                self.wait_healthy([c], timeout)
        self.wait_healthy(workers, timeout)
        self.wait_registered(workers, timeout)
        self.router.start(self.env)
        self.wait_healthy([self.router], timeout)
        return self

    def restart_router(self, timeout: float = 120.0) -> None:
        """Stop the router and start a fresh one (no memory of earlier routes)."""
        self._stop_group([self.router], 10.0)
        self.router.start(self.env)
        self.wait_healthy([self.router], timeout)

    def wait_registered(self, children: list[Child], timeout: float = 60.0) -> None:
        client = redis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=2.0)
        deadline = time.monotonic() + timeout
        try:
            while not all(client.exists(schema.record_key(c.instance_id)) for c in children):
                for c in children:
                    if not c.alive():
                        self.stop()
                        raise RuntimeError(f"{c.instance_id} exited during start-up:\n{c.log_tail()}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"workers not registered in {self.redis_url} after {timeout:.0f}s")
                time.sleep(0.1)
        finally:
            client.close()

    def wait_healthy(self, children: list[Child], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(children)
        while pending:
            for c in list(pending):
                if not c.alive():
                    self.stop()
                    raise RuntimeError(f"{c.instance_id} exited during start-up:\n{c.log_tail()}")
                if _serving(c.health_address):
                    pending.remove(c)
            if pending and time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"not healthy after {timeout:.0f}s: {[c.instance_id for c in pending]}")
            time.sleep(0.2)

    def print_summary(self) -> None:
        print("pdserve is up:")
        for c in self.children:
            extra = f"http://{self.host}:{self.http_port} (/healthz, /metrics)" if c is self.router else \
                f"metrics http://{self.host}:{c.metrics_port}/metrics"
            print(f"  {c.instance_id:<10} grpc {c.address:<22} {extra}")
        print(f"  {'registry':<10} {_without_password(self.redis_url)}" + (" (private redis-server, password set)"
                                                                          if self.redis else ""))
        print(f"try: pdserve generate --url {self.router_address} \"What is AI?\"", flush=True)

    def wait(self, policy: RestartPolicy = RestartPolicy()) -> int:
        """Supervise until SIGINT/SIGTERM (0) or a crash loop (1); then stop everything."""
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        try:
            self.supervise(stop, policy)
            return 0
        except CrashLoop as e:
            print(f"pdserve: {e}; stopping", file=sys.stderr, flush=True)
            return 1
        finally:
            self.stop()

    def supervise(self, stop: threading.Event, policy: RestartPolicy = RestartPolicy(), poll_s: float = 0.2) -> None:
        """Restart children that exit (and the private Redis) until `stop` is set; raises CrashLoop.
        Runs in any thread (the tests and the soak run it beside their load)."""
        while not stop.wait(poll_s):
            if self.redis is not None and not self.redis.alive() and not stop.is_set():
                print("pdserve: the private redis-server exited; restarting it", file=sys.stderr, flush=True)
                self.redis.start()
            for child in self.children:
                if not stop.is_set():
                    self._supervise_child(child, policy)

    def _supervise_child(self, child: Child, policy: RestartPolicy) -> None:
        if child.proc is None or child.alive():
            return
        now = time.monotonic()
        if child.restart_at is None:
            recent = policy.recent(child.restarts, now)
            if recent + 1 >= policy.crash_loop_restarts:
                raise CrashLoop(f"{child.instance_id} exited ({child.proc.returncode}) after {recent} restarts "
                                f"within {policy.crash_loop_window_s:.0f}s")
            child.restart_at = now + policy.backoff(recent)
            print(f"pdserve: {child.instance_id} exited ({child.proc.returncode}); restarting in "
                  f"{child.restart_at - now:.1f}s", file=sys.stderr, flush=True)
        elif now >= child.restart_at:
            child.restart_at = None
            child.restarts.append(now)
            child.start(self.env)
            print(f"pdserve: restarted {child.instance_id} (pid {child.proc.pid})", file=sys.stderr, flush=True)

    def stop(self, grace: float = 10.0) -> None:
        for group in ([self.router], self.decodes, self.prefills):
            self._stop_group(group, grace)
        if self.redis is not None:
            self.redis.stop()
        shutil.rmtree(self.secrets, ignore_errors=True)

    @staticmethod
    def _stop_group(group: list[Child], grace: float) -> None:
        for c in group:
            if c.alive():
                c.proc.send_signal(signal.SIGTERM)
        for c in group:
            if c.proc is None:
                continue
            try:
                c.proc.wait(grace)
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{parts.hostname}:{parts.port}"))


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
