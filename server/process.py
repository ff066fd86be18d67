"""Run ``actprune serve`` as a child process: tests, benchmarks and ``make demo`` use it.

The server starts in its own session (process group), because vLLM forks an engine-core
process and worker processes; stopping kills the whole group, so nothing is left running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

__all__ = ["ServerProcess", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``with ServerProcess(model, ["--enforce-eager"]) as srv: srv.base_url``"""

    def __init__(
        self,
        model: str | Path,
        args: list[str] | None = None,
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
        startup_timeout: float = 600.0,
    ) -> None:
        self.model = str(model)
        self.args = list(args or [])
        self.port = port or free_port()
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        if _port_busy(self.port):
            raise RuntimeError(f"port {self.port} is already in use; choose another with --port")
        cmd = [sys.executable, "-m", "actprune.server.launch", self.model, "--host", "127.0.0.1",
               "--port", str(self.port), *self.args]
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        self._wait_healthy()
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"actprune serve exited with code {self.proc.returncode}{self._tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"server not healthy after {self.startup_timeout:.0f}s{self._tail()}")

    def _tail(self) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()[-40:]
        return "\n--- server log (last lines) ---\n" + "\n".join(text)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (kill -9 by default) without waiting politely."""
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=60)

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful stop: SIGTERM to the API server only (it shuts its engine down and writes
        the final snapshot), then SIGKILL to whatever is left in the process group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
