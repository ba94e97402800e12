"""Shared fixtures: real servers started once per test session by scripts/peers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support import ProxyProcess, peer_missing


@pytest.fixture(scope="session")
def pg(tmp_path_factory):
    """A real PostgreSQL 15 with one user per backend auth method, TLS on."""
    from scripts.peers.postgres import pg_bindir, start_postgres

    try:
        pg_bindir()
    except Exception as exc:
        peer_missing(f"PostgreSQL server binaries ({exc}); run scripts/install/postgres.sh")
    server = start_postgres(tmp_path_factory.mktemp("pg"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real OpenSSH sshd on a loopback port: its own host key, one authorized key for the test user."""
    from scripts.peers.sshd import sshd_bin, start_sshd

    try:
        sshd_bin()
    except FileNotFoundError as exc:
        peer_missing(f"{exc}")
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture
def proxy_factory(tmp_path):
    """Start real ``dbproxy serve`` processes; all are stopped at teardown."""
    started: list[ProxyProcess] = []

    def start(config: dict, *, name: str = "proxy", env: dict | None = None, workdir: Path | None = None) -> ProxyProcess:
        proc = ProxyProcess(workdir or tmp_path, config, env=env, name=name).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        peer_missing(f"{name} not on PATH")
    return path
