"""Start a real `cxr-serve` process on a free loopback port (tests and benchmarks)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, command: list[str], port: int, log_path: Path, env: dict | None = None):
        self.command, self.port, self.log_path = command, port, Path(log_path)
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(self.log_path, "wb")
        # Own session: teardown signals the whole group, so no inference worker outlives the test. Ctrl-C acts as in
        # a terminal even when these tests run in the background, whose processes a shell starts ignoring SIGINT.
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})},
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def health_status(self) -> int | None:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def wait_healthy(self, timeout: float = 180.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if self.health_status() == 200:
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        try:  # leftovers in the group (workers) after the main process exited
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()

    def __enter__(self) -> "ServerProcess":
        return self.wait_healthy()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_command(ckpt_path: str | Path, port: int, run_dir: str | Path, *overrides: str) -> list[str]:
    exe = Path(sys.executable).with_name("cxr-serve")
    return [str(exe) if exe.exists() else "cxr-serve", f"ckpt_path={ckpt_path}", f"server.port={port}",
            "server.host=127.0.0.1", f"hydra.run.dir={run_dir}", *overrides]


def start_server(ckpt_path, tmp_dir: str | Path, *overrides: str, env: dict | None = None) -> ServerProcess:
    port = free_port()
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    return ServerProcess(serve_command(ckpt_path, port, tmp_dir / "run", *overrides), port, tmp_dir / "server.log",
                         env=env)
