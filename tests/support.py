"""Test support: run the real ``dbproxy serve`` in a subprocess and read its audit trail.

The proxy runs as its own process (the CLI users run), so tests exercise the
config loader, the listeners and signal handling exactly as deployed, and
blocking clients (psycopg, psql, cqlsh, pymongo) in the test process do not
share an event loop or a GIL with it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def peer_missing(what: str) -> None:
    """A real test peer is not available: fail under CI (a skip would hide a missing install), else skip."""
    if IN_CI:
        pytest.fail(f"test peer missing under CI: {what}")
    pytest.skip(f"test peer missing: {what}")


class ProxyProcess:
    def __init__(self, workdir: Path, config: dict, *, env: dict | None = None, name: str = "proxy") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.config_path = self.workdir / f"{name}.json"
        self.log_path = self.workdir / f"{name}.log"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.env = dict(os.environ, **(env or {}))
        self.env["PYTHONPATH"] = str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}

    def start(self, timeout: float = 20.0) -> "ProxyProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dbproxy.cli", "serve", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=str(self.workdir),
        )
        deadline = time.monotonic() + timeout
        expected = len(self.config["listeners"])
        while time.monotonic() < deadline:
            text = self.log_text()
            found = dict(
                (m.group(1), int(m.group(2)))
                for m in re.finditer(r"dbproxy: (\S+) \(\w+\) listening on [\d.:\[\]a-f]+:(\d+)", text)
            )
            if len(found) >= expected:
                self.ports = found
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise TimeoutError(f"proxy did not start:\n{self.log_text()}")

    def port(self, listener: str | None = None) -> int:
        if listener is None:
            (port,) = self.ports.values()
            return port
        return self.ports[listener]

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def read_audit(path: Path | str, *, wait_for: int = 0, timeout: float = 10.0) -> list[dict]:
    """Audit events of a JSONL file; waits until at least ``wait_for`` events are there."""
    deadline = time.monotonic() + timeout
    while True:
        events: list[dict] = []
        try:
            with open(path, "rb") as f:
                for line in f:
                    # The writer may be mid-line: only complete lines count.
                    if line.endswith(b"\n") and line.strip():
                        events.append(orjson.loads(line))
        except FileNotFoundError:
            pass
        if len(events) >= wait_for or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)
